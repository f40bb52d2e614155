"""wavg_fused: an averaged copy of a model (EMA, SWA, T-ADEMA) updated with one fused pass.

>>> import torch, wavg_fused as wf
>>> model = torch.nn.Linear(8, 8)
>>> avg = wf.Averager(model, wf.EMA(0.999))
>>> avg.update(model)
"""

from . import optim
from .averager import Averager
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
from .swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn
from .unwrap import de_parallel

__version__ = "0.1.0"

__all__ = [
    "Averager",
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
    "available_backends",
    "backend_report",
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
