"""Putting the average into the live model and taking it out again, one launch per plan.

Two ways, chosen by dtype. When every averaged tensor has the model tensor's dtype, the kernels
exchange the two in place (``MODE_SWAP``): no extra memory, and exchanging twice is the identity
bit for bit. When they differ (an fp32 average of a bf16 model), an exchange would round the
average into the model's dtype and lose it, so the live weights are first copied into a backup
buffer (the update kernel with every tensor in the copy role), the average is cast into the
model (``MODE_COPY_TO_MODEL``), and the backup is copied back at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .backends.base import Backend
from .methods import SWA
from .plan import MODE_COPY_TO_MODEL, MODE_SWAP, ROLE_COPY, Plan
from .storage import aligned_offset

__all__ = ["Runs", "can_exchange", "copy_into_model", "exchange", "save_model", "restore_model"]

Runs = Sequence[tuple[Plan, Backend]]


def _transfer(runs: Runs, mode: int) -> None:
    for plan, backend in runs:
        plan.stage()  # a staged model tensor is written through its staging buffer, then copied back
        backend.transfer(plan, mode)
        plan.unstage()


def can_exchange(runs: Runs) -> bool:
    """Whether every shadow tensor has its model tensor's dtype (an in-place exchange is lossless)."""
    return all(s.dtype == m.dtype for plan, _ in runs for s, m in zip(plan.shadows, plan.models))


def copy_into_model(runs: Runs) -> None:
    """model <- average, cast to the model's dtypes: one launch per plan."""
    _transfer(runs, MODE_COPY_TO_MODEL)


def exchange(runs: Runs) -> None:
    """Swap average and model values in place (equal dtypes only): one launch per plan."""
    _transfer(runs, MODE_SWAP)


def _backup_plan(plan: Plan) -> Plan:
    # Fresh buffers in the model's dtypes with the shadows' layouts, one flat per dtype.
    ends: dict[torch.dtype, int] = {}
    offsets = []
    for shadow, model in zip(plan.shadows, plan.models):
        start = aligned_offset(ends.get(model.dtype, 0), model.element_size())
        offsets.append(start)
        ends[model.dtype] = start + shadow.numel()
    flats = {dtype: torch.empty(end, dtype=dtype, device=plan.device) for dtype, end in ends.items()}
    backups = [
        flats[model.dtype].as_strided(shadow.shape, shadow.stride(), offset)
        for shadow, model, offset in zip(plan.shadows, plan.models, offsets)
    ]
    return Plan(plan.names, backups, plan.models, [ROLE_COPY] * len(backups), offsets, list(flats.values()))


def save_model(runs: Runs) -> list[tuple[Plan, Backend]]:
    """Copy the model's current values into new backup buffers (one launch per plan)."""
    backups = []
    for plan, backend in runs:
        backup = _backup_plan(plan)
        backend.update(backup, SWA(), backup.spare_count, False)  # every role is a copy: the method is moot
        backups.append((backup, backend))
    return backups


def restore_model(backups: Runs) -> None:
    """Write what ``save_model`` saved back into the model."""
    copy_into_model(backups)
