"""timm's ``ModelEmaV3`` and ``ModelEmaV2`` (timm >= 1.0.31) on the fused path.

Change the import, keep the rest of the training script::

    from wavg_fused.integrations.timm import ModelEmaV3   # was: from timm.utils import ModelEmaV3
    model_ema = ModelEmaV3(model, decay=0.9998, use_warmup=True)
    model_ema.update(model, step=num_updates)

Same constructor and defaults, ``get_decay(step)``, ``update(model, step=None)``, ``set(model)``,
``.module`` and ``forward``; the state dict is timm's (``module.<name>``), so ``CheckpointSaver``
writes it as ``state_dict_ema`` and ``load_checkpoint(model_ema.module, path, use_ema=True)``
reads it back, and checkpoints move between timm's class and this one both ways. Each update is
one fused pass (timm: a ``_foreach_lerp_`` plus casts and a Python walk over the state dict).
The decay is computed on the host from ``step`` exactly as timm computes it, so the averaged
values equal timm's bit for bit for fp32 models on the ``cpu`` and ``torch`` backends.

Where it differs from timm (docs/migrating.md): tied tensors (GPT-2's ``lm_head``) are
averaged once per update, where ``ModelEmaV3`` with buffers averages them once per name (twice);
non-persistent floating buffers are averaged like the other buffers, where timm's state-dict walk
never updates them; a bf16 model with ``dtype=torch.float32`` goes through the fused lerp where
timm multiplies and adds (an ulp apart); stochastic rounding draws other random bits (Philox,
keyed by seed, update count and element; same distribution); ``foreach`` is accepted and has no
effect; ``ModelEmaV2`` copies integer buffers, where timm's ``decay * e + (1 - decay) * m`` truncates
into them (``num_batches_tracked`` stalls), and blends with a lerp (an ulp apart).

timm is not needed to use these classes; ``import wavg_fused`` never imports this module.

Examples:
    >>> import torch
    >>> from wavg_fused.integrations.timm import ModelEmaV3
    >>> model = torch.nn.Linear(4, 2)
    >>> ema = ModelEmaV3(model, decay=0.9, use_warmup=True)
    >>> ema.get_decay(1), round(ema.get_decay(4), 4)
    (0.0, 0.6031)
    >>> ema.update(model, step=1)
    >>> list(ema.state_dict())
    ['module.weight', 'module.bias']
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..averager import Averager
from ..methods import EMA
from ._holder import AveragerHolder

__all__ = ["ModelEmaV2", "ModelEmaV3"]


class ModelEmaV3(AveragerHolder):
    """timm's ``ModelEmaV3``: an EMA of every parameter and buffer, decay warm-up by ``step``.

    Arguments as in timm 1.0.31; ``backend`` (keyword-only) is ``Averager``'s. ``exclude_buffers``
    copies buffers instead of averaging them; integer buffers are always copied (as in timm).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        min_decay: float = 0.0,
        update_after_step: int = 0,
        use_warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        stochastic_rounding: bool = True,
        stochastic_rounding_seed: int = 0,
        foreach: bool = True,
        exclude_buffers: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.decay, self.min_decay = decay, min_decay
        self.update_after_step = update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.device, self.dtype = device, dtype
        self.stochastic_rounding, self.stochastic_rounding_seed = stochastic_rounding, stochastic_rounding_seed
        self.foreach = foreach  # timm's choice of kernels; the fused pass replaces both of its paths
        self.exclude_buffers = exclude_buffers
        averager = Averager(
            model, EMA(decay), use_buffers=not exclude_buffers, device=device, dtype=dtype, backend=backend,
            stochastic_rounding=stochastic_rounding, rounding_seed=stochastic_rounding_seed,
        )
        self.module = self._hold(averager)
        self.module.eval()

    def get_decay(self, step: int | None = None) -> float:
        """The decay of the update at ``step``: ``decay`` without a step; 0 (a copy) up to
        ``update_after_step + 1``; then, with ``use_warmup``, ``1 - (1 + t / warmup_gamma) **
        -warmup_power`` for ``t = step - update_after_step - 1``, kept within [min_decay, decay]."""
        if step is None:
            return self.decay
        elapsed = step - self.update_after_step - 1
        if elapsed <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        warm = 1 - (1 + elapsed / self.warmup_gamma) ** -self.warmup_power
        return max(self.min_decay, min(warm, self.decay))  # min_decay wins a conflict, as in timm

    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Blend ``model`` into the average with ``get_decay(step)``: one fused pass."""
        self._blend(model, self.get_decay(step))

    def set(self, model: nn.Module) -> None:
        """Copy every parameter and buffer of ``model`` into the average."""
        self._blend(model, 0.0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class ModelEmaV2(ModelEmaV3):
    """timm's ``ModelEmaV2(model, decay=0.9999, device=None)``: a fixed-decay EMA of every
    parameter and buffer, ``update(model)`` and ``set(model)``."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, device: torch.device | str | None = None,
                 *, backend: str = "auto") -> None:
        super().__init__(model, decay=decay, device=device, stochastic_rounding=False, backend=backend)

    def update(self, model: nn.Module) -> None:  # type: ignore[override]  # timm's V2 takes no step
        self._blend(model, self.decay)
