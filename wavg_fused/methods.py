"""Averaging methods: each one is the step weight ``w_n`` of the rule ``s <- s + w_n * (m - s)``.

``n`` is the number of updates averaged so far (``n_averaged`` before this update). Every method
has ``w_0 = 1``, so the first update copies the model. The weight is computed *on the device*
from the ``n_averaged`` tensor, so an update never reads a device value on the host; the fused
kernels evaluate the same formulas from ``(code, params)`` (see ``csrc/wavg_rule.h``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

__all__ = ["Method", "EMA", "SWA", "TADEMA"]


class Method:
    """Base class of an averaging rule; subclasses define ``step_weight`` and ``params``.

    ``code`` identifies the rule for the fused kernels and ``params`` carries its two
    hyperparameters (unused slots are 0.0), so kernels need no Python callback.
    """

    code: ClassVar[int]
    name: ClassVar[str]

    @property
    def params(self) -> tuple[float, float]:
        return (0.0, 0.0)

    def step_weight(self, n_averaged: torch.Tensor) -> torch.Tensor:
        """``w_n`` as a float64 tensor on ``n_averaged``'s device (no host read)."""
        raise NotImplementedError


def _check_unit_interval(value: float, arg: str, method: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{method}: {arg} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{method}: {arg} must be in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class EMA(Method):
    """Exponential moving average: ``w_n = 1 - decay`` for ``n >= 1``.

    >>> import torch, wavg_fused as wf
    >>> float(wf.EMA(0.9).step_weight(torch.tensor(3)))
    0.09999999999999998
    """

    decay: float = 0.999
    code: ClassVar[int] = 0
    name: ClassVar[str] = "ema"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_unit_interval(self.decay, "decay", "EMA"))

    @property
    def params(self) -> tuple[float, float]:
        return (self.decay, 0.0)

    def step_weight(self, n_averaged: torch.Tensor) -> torch.Tensor:
        started = (n_averaged > 0).to(torch.float64)
        return 1.0 - self.decay * started


@dataclass(frozen=True)
class SWA(Method):
    """Stochastic weight averaging, the equal-weight running mean: ``w_n = 1 / (n + 1)``.

    >>> import torch, wavg_fused as wf
    >>> float(wf.SWA().step_weight(torch.tensor(3)))
    0.25
    """

    code: ClassVar[int] = 1
    name: ClassVar[str] = "swa"

    def step_weight(self, n_averaged: torch.Tensor) -> torch.Tensor:
        return 1.0 / (n_averaged.to(torch.float64) + 1.0)


@dataclass(frozen=True)
class TADEMA(Method):
    """Tanh-adaptive EMA: ``w_n = 1 - alpha * tanh(n)``, ``n`` counted once per update.

    The seed blog's closure bumps its counter once per *tensor*, so its decay saturates at
    ``alpha`` within the first update of any real model; this is the intended per-update rule.

    >>> import torch, wavg_fused as wf
    >>> round(float(wf.TADEMA(0.9).step_weight(torch.tensor(1))), 6)
    0.314565
    """

    alpha: float = 0.9
    code: ClassVar[int] = 2
    name: ClassVar[str] = "t_adema"

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_unit_interval(self.alpha, "alpha", "TADEMA"))

    @property
    def params(self) -> tuple[float, float]:
        return (self.alpha, 0.0)

    def step_weight(self, n_averaged: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.alpha * torch.tanh(n_averaged.to(torch.float64))
