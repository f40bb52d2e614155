"""The interface every backend implements; kept apart so backends import nothing from each other."""

from __future__ import annotations

from typing import Protocol

import torch

from ..methods import Method
from ..plan import Plan


class Backend(Protocol):
    """One way to run an update over a plan.

    ``update`` applies ``method`` to every tensor of ``plan`` reading ``n_averaged`` (a 0-dim
    ``torch.long`` tensor on ``plan.device``) on the device, and adds 1 to it when ``bump``.
    It must not read a device value on the host. A non-negative ``rounding_seed`` rounds averaged
    bfloat16 shadows stochastically, bit for bit as ``wavg_fused.rounding`` does.
    """

    name: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """``None`` if this backend can update tensors on ``device``, else why not."""
        ...

    def prepare(self, plan: Plan) -> None:
        """Build what launches on ``plan`` read (tables, caches) now, when the plan is made, so
        that no launch builds one (a compiled graph cannot)."""
        ...

    def update(self, plan: Plan, method: Method, n_averaged: torch.Tensor, bump: bool, rounding_seed: int = -1,
               guard: bool = False, n_skipped: torch.Tensor | None = None, staged: bool = False) -> None:
        """With ``guard``, read the flag ``check_nonfinite`` left in ``plan.workspace[1]`` on the
        device: if set, write no shadow, bump ``n_skipped`` (if given) instead of ``n_averaged``
        and clear the flag. ``staged``: ``check_nonfinite`` staged the model already."""
        ...

    def check_nonfinite(self, plan: Plan) -> None:
        """Stage the model, then set ``plan.workspace[1]`` (on the device, no host read) if an
        averaged model value is Inf or NaN; never clear it."""
        ...

    def transfer(self, plan: Plan, mode: int) -> None:
        """Write the model tensors of ``plan`` (as staged, see ``Plan.unstage``): ``MODE_COPY_TO_MODEL``
        casts the shadow into the model, ``MODE_SWAP`` exchanges the two (equal dtypes only)."""
        ...
