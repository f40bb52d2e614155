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

    def update(
        self, plan: Plan, method: Method, n_averaged: torch.Tensor, bump: bool, rounding_seed: int = -1
    ) -> None: ...

    def transfer(self, plan: Plan, mode: int) -> None:
        """Write the model tensors of ``plan`` (as staged, see ``Plan.unstage``): ``MODE_COPY_TO_MODEL``
        casts the shadow into the model, ``MODE_SWAP`` exchanges the two (equal dtypes only)."""
        ...
