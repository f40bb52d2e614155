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

__all__ = ["Method", "EMA", "SWA", "TADEMA", "EMAWarmup", "PowerEMA", "sigma_rel_to_gamma"]


class Method:
    """Base class of an averaging rule; subclasses define ``step_weight`` and ``params``.

    ``code`` identifies the rule for the fused kernels and ``params`` carries its
    hyperparameters (at most four), so kernels need no Python callback.
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

    Examples:
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

    Examples:
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

    Examples:
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


def _check_positive(value: float, arg: str, method: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{method}: {arg} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EMAWarmup(Method):
    """EMA whose decay warms up: ``decay_n = clamp(1 - (1 + n / inv_gamma) ** -power, min_decay,
    decay)``, ``w_n = 1 - decay_n`` (the schedule of diffusers' ``EMAModel`` and ema-pytorch).

    ``inv_gamma=1, power=2/3`` reaches decay 0.999 near 31.6k updates and 0.9999 near 1M;
    ``power=3/4`` reaches them near 10k and 215k updates.

    Examples:
        >>> import torch, wavg_fused as wf
        >>> m = wf.EMAWarmup(decay=0.999, power=1.0)
        >>> [round(float(m.step_weight(torch.tensor(n))), 4) for n in (0, 1, 3, 10**6)]
        [1.0, 0.5, 0.25, 0.001]
    """

    decay: float = 0.9999
    inv_gamma: float = 1.0
    power: float = 2 / 3
    min_decay: float = 0.0
    code: ClassVar[int] = 3
    name: ClassVar[str] = "ema_warmup"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _check_unit_interval(self.decay, "decay", "EMAWarmup"))
        object.__setattr__(self, "min_decay", _check_unit_interval(self.min_decay, "min_decay", "EMAWarmup"))
        object.__setattr__(self, "inv_gamma", _check_positive(self.inv_gamma, "inv_gamma", "EMAWarmup"))
        object.__setattr__(self, "power", _check_positive(self.power, "power", "EMAWarmup"))
        if self.min_decay > self.decay:
            raise ValueError(f"EMAWarmup: min_decay ({self.min_decay}) must not exceed decay ({self.decay})")

    @property
    def params(self) -> tuple[float, ...]:
        return (self.decay, self.inv_gamma, self.power, self.min_decay)

    def step_weight(self, n_averaged: torch.Tensor) -> torch.Tensor:
        n = n_averaged.to(torch.float64)
        decay = (1.0 - (1.0 + n / self.inv_gamma) ** -self.power).clamp(self.min_decay, self.decay)
        return torch.where(n_averaged > 0, 1.0 - decay, torch.ones_like(n))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-EMA exponent ``gamma`` whose averaging profile has relative standard deviation
    ``sigma_rel`` (Karras et al. 2024, EDM2): solves ``sigma_rel**2 = (g + 1) / ((g + 2)**2 (g + 3))``.

    Examples:
        >>> round(sigma_rel_to_gamma(0.10), 2), round(sigma_rel_to_gamma(0.05), 2)
        (6.94, 16.97)
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0 < sigma_rel < 12 ** -0.5:
        raise ValueError(f"sigma_rel must be in (0, {12 ** -0.5:.4f}) (gamma > 0), got {sigma_rel!r}")
    target = float(sigma_rel) ** 2

    def variance(g: float) -> float:  # decreasing in g for g > -1
        return (g + 1) / ((g + 2) ** 2 * (g + 3))

    low, high = 0.0, 1.0
    while variance(high) > target:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if variance(mid) > target else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class PowerEMA(Method):
    """Power-function EMA (Karras et al. 2024, EDM2): ``w_n = 1 - (n / (n + 1)) ** (gamma + 1)``,
    an average whose length grows with training. Give ``gamma`` or ``sigma_rel`` (the EDM2
    paper's width, e.g. 0.05 or 0.10).

    Examples:
        >>> import torch, wavg_fused as wf
        >>> m = wf.PowerEMA(gamma=0.0)   # gamma 0 is the plain running mean (SWA)
        >>> [float(m.step_weight(torch.tensor(n))) for n in (0, 1, 3)]
        [1.0, 0.5, 0.25]
        >>> round(wf.PowerEMA(sigma_rel=0.10).gamma, 2)
        6.94
    """

    gamma: float | None = None
    sigma_rel: float | None = None
    code: ClassVar[int] = 4
    name: ClassVar[str] = "power_ema"

    def __post_init__(self) -> None:
        if (self.gamma is None) == (self.sigma_rel is None):
            raise ValueError(f"PowerEMA: give exactly one of gamma and sigma_rel, got gamma={self.gamma!r}, "
                             f"sigma_rel={self.sigma_rel!r}")
        if self.sigma_rel is not None:
            object.__setattr__(self, "gamma", sigma_rel_to_gamma(self.sigma_rel))
        elif isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0 <= self.gamma < math.inf:
            raise ValueError(f"PowerEMA: gamma must be a finite number >= 0, got {self.gamma!r}")
        object.__setattr__(self, "gamma", float(self.gamma))

    @property
    def params(self) -> tuple[float, ...]:
        return (self.gamma,)

    def step_weight(self, n_averaged: torch.Tensor) -> torch.Tensor:
        n = n_averaged.to(torch.float64)
        return 1.0 - (n / (n + 1.0)) ** (self.gamma + 1.0)
