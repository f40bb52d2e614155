"""wavg_fused: an averaged copy of a model (EMA, SWA, T-ADEMA) updated with one fused pass.

>>> import torch, wavg_fused as wf
>>> model = torch.nn.Linear(8, 8)
>>> avg = wf.Averager(model, wf.EMA(0.999))
>>> avg.update(model)
"""

from ._version import version as _version

__version__ = _version()

# Before the modules that import wavg_fused._C at import time: an extension built on first use by
# an earlier process is loaded here (never compiled here; see wavg_fused._extension).
from . import _extension  # noqa: E402

_extension.preload()

from . import optim  # noqa: E402
from ._extension import SlowPathWarning
from .averager import Averager
from .group import AveragerGroup
from . import distributed
from .backends import available_backends, backend_report
from .blog import (
    AveragingBaseModel,
    EMAModel,
    SWAModel,
    T_ADEMAModel,
    get_ema_avg_fn,
    get_swa_avg_fn,
    get_t_adema,
    get_t_adema_fn,
)
from .methods import EMA, SWA, TADEMA, EMAWarmup, Method, PowerEMA, sigma_rel_to_gamma
from .posthoc import PostHocEMA
from .swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn
from .unwrap import de_parallel

__all__ = [
    "Averager",
    "AveragerGroup",
    "AveragedModel",
    "get_ema_multi_avg_fn",
    "get_swa_multi_avg_fn",
    "Method",
    "EMA",
    "SWA",
    "TADEMA",
    "EMAWarmup",
    "PowerEMA",
    "sigma_rel_to_gamma",
    "PostHocEMA",
    "available_backends",
    "backend_report",
    "SlowPathWarning",
    "de_parallel",
    "AveragingBaseModel",
    "EMAModel",
    "SWAModel",
    "T_ADEMAModel",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
    "get_t_adema_fn",
    "get_t_adema",
    "optim",
    "distributed",
]
