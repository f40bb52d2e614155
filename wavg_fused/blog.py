"""The seed blog's API: ``AveragingBaseModel``, ``EMAModel``, ``SWAModel``, ``T_ADEMAModel``.

Same constructors and defaults as the blog; the built-in rules run on the fused path. Two
deliberate differences, both fixes:

* T-ADEMA counts ``n`` once per *update* (``decay_n = alpha * tanh(n)``); the blog's closure
  counts once per tensor, so its decay reached ``alpha`` within the first update of any model.
* With ``use_buffers=True`` integer buffers (BatchNorm's ``num_batches_tracked``) are copied;
  the blog averaged them as floats and truncated.

One addition: ``cuda=True`` without CUDA still keeps the average on the CPU, as in the blog, but
says so once per process (a ``UserWarning``) instead of silently.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .averager import Averager, AvgFn
from .methods import EMA, SWA, TADEMA, Method

__all__ = [
    "AveragingBaseModel",
    "EMAModel",
    "SWAModel",
    "T_ADEMAModel",
    "get_ema_avg_fn",
    "get_swa_avg_fn",
    "get_t_adema_fn",
    "get_t_adema",
]


def _tagged(fn: AvgFn, method: Method) -> AvgFn:
    fn.wavg_method = method  # lets AveragingBaseModel take the fused path for this rule
    return fn


def get_ema_avg_fn(decay: float = 0.999) -> AvgFn:
    """The blog's EMA rule ``decay * averaged + (1 - decay) * model`` (fused when given to a model)."""
    method = EMA(decay)

    @torch.no_grad()
    def ema_update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        return method.decay * averaged + (1 - method.decay) * current

    return _tagged(ema_update, method)


def get_swa_avg_fn() -> AvgFn:
    """The blog's SWA rule ``averaged + (model - averaged) / (n + 1)``."""

    @torch.no_grad()
    def swa_update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        return averaged + (current - averaged) / (num_averaged + 1)

    return _tagged(swa_update, SWA())


def get_t_adema_fn(alpha: float = 0.9) -> AvgFn:
    """T-ADEMA ``decay = alpha * tanh(n)``, with ``n`` the updates averaged so far (per update)."""
    method = TADEMA(alpha)

    @torch.no_grad()
    def t_adema_update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        decay = method.alpha * torch.tanh(torch.as_tensor(num_averaged, dtype=torch.float32))
        return decay * averaged + (1 - decay) * current

    return _tagged(t_adema_update, method)


get_t_adema = get_t_adema_fn  # the blog's name

_warned_no_cuda = False


def _frames_in_this_file() -> int:
    frame, n = sys._getframe(1), 0
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, n = frame.f_back, n + 1
    return n


def _blog_device(cuda: bool) -> str:
    """``"cuda"`` when asked for and available; otherwise ``"cpu"``, warning once if CUDA was asked for."""
    global _warned_no_cuda
    if not cuda:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if not _warned_no_cuda:
        _warned_no_cuda = True
        warnings.warn(
            "AveragingBaseModel(cuda=True): CUDA is not available, so the average stays on the CPU",
            UserWarning,
            stacklevel=_frames_in_this_file() + 1,  # point at the user's line, not EMAModel's
        )
    return "cpu"


class AveragingBaseModel(Averager):
    """The blog's base class: ``cuda=True`` keeps the average on the GPU when there is one.

    Without CUDA, ``cuda=True`` keeps it on the CPU and warns (once per process).

    ``avg_fn`` from ``get_*_avg_fn`` runs fused; any other ``avg_fn(averaged, model, n)`` runs
    per tensor (slow path); ``None`` means SWA, as in ``torch.optim.swa_utils.AveragedModel``.

    Examples:
        >>> import torch, wavg_fused as wf
        >>> net = torch.nn.Linear(3, 3)
        >>> ema = wf.EMAModel(net, decay=0.9)
        >>> ema.update(net); int(ema.n_averaged)
        1
    """

    def __init__(
        self,
        model: nn.Module,
        cuda: bool = False,
        avg_fn: Callable | None = None,
        use_buffers: bool = False,
    ) -> None:
        device = _blog_device(cuda)
        method = getattr(avg_fn, "wavg_method", avg_fn)
        super().__init__(model, method, use_buffers=use_buffers, device=device)
        self.avg_fn = avg_fn


class EMAModel(AveragingBaseModel):
    def __init__(self, model: nn.Module, cuda: bool = False, decay: float = 0.9, use_buffers: bool = False) -> None:
        super().__init__(model=model, cuda=cuda, avg_fn=get_ema_avg_fn(decay), use_buffers=use_buffers)


class SWAModel(AveragingBaseModel):
    def __init__(self, model: nn.Module, cuda: bool = False, use_buffers: bool = False) -> None:
        super().__init__(model=model, cuda=cuda, avg_fn=get_swa_avg_fn(), use_buffers=use_buffers)


class T_ADEMAModel(AveragingBaseModel):  # noqa: N801 - the blog's name
    def __init__(self, model: nn.Module, cuda: bool = False, alpha: float = 0.9, use_buffers: bool = False) -> None:
        super().__init__(model=model, cuda=cuda, avg_fn=get_t_adema_fn(alpha), use_buffers=use_buffers)
