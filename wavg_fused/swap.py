"""Putting the average into the live model and taking it out again, one launch per plan.

Two ways, chosen by dtype. When every averaged tensor has the model tensor's dtype, the kernels
exchange the two in place (``MODE_SWAP``): no extra memory, and exchanging twice is the identity
bit for bit. When they differ (an fp32 average of a bf16 model), an exchange would round the
average into the model's dtype and lose it, so the live weights are first copied into a backup
buffer (the update kernel with every tensor in the copy role), the average is cast into the
model (``MODE_COPY_TO_MODEL``), and the backup is copied back at the end.

The kernels write the model at the addresses in the plan, which autograd cannot see: every
transfer bumps the version counters of the tensors it wrote, so a backward through a graph
that saved a weight the swap replaced raises instead of using the wrong values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .backends.base import Backend
from .methods import SWA
from .plan import MODE_COPY_TO_MODEL, MODE_SWAP, ROLE_COPY, Plan
from .storage import aligned_offset

__all__ = [
    "Runs",
    "can_exchange",
    "copy_into_model",
    "exchange",
    "save_model",
    "restore_model",
    "pin_model",
    "restore_replaced",
]

Runs = Sequence[tuple[Plan, Backend]]


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    # what an in-place op does to autograd's version counter; host metadata only, no device work
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.6 takes one tensor per call
        for tensor in tensors:
            torch.autograd.graph.increment_version(tensor)


def _transfer(runs: Runs, mode: int) -> None:
    for plan, backend in runs:
        plan.stage()  # a staged model tensor is written through its staging buffer, then copied back
        backend.transfer(plan, mode)
        plan.mark_stream()
        plan.unstage()
        _bump_versions(plan.models + plan.shadows if mode == MODE_SWAP else plan.models)


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
        backup.mark_stream()
        backups.append((backup, backend))
    return backups


def restore_model(backups: Runs) -> None:
    """Write what ``save_model`` saved back into the model."""
    copy_into_model(backups)


def pin_model(runs: Runs) -> list[list[torch.UntypedStorage]]:
    """The storages of the model memory the plans address, one list per plan.

    Held while the average is swapped in, so that memory outlives a model whose tensors are
    replaced meanwhile (``model.half()`` inside the block rebinds ``param.data`` and would free
    the memory the kernels are about to write; after an exchange it even holds the average).
    Host references only: no op runs.
    """
    for plan, _ in runs:
        plan.model_layouts()  # recorded while the plan is current
    return [[model.untyped_storage() for model in plan.models] for plan, _ in runs]


def _pinned_views(plan: Plan, storages: list[torch.UntypedStorage]) -> list[torch.Tensor]:
    return [
        torch.empty(0, dtype=dtype, device=storage.device).set_(storage, offset, shape, stride)
        for storage, (offset, shape, stride, dtype) in zip(storages, plan.model_layouts())
    ]


def restore_replaced(
    runs: Runs,
    pinned: list[list[torch.UntypedStorage]],
    backups: Runs | None,
    current: Mapping[str, torch.Tensor],
) -> tuple[list[str], list[str]]:
    """Take the average out of a model some of whose tensors were replaced while it was in.

    The slow path, per tensor: the averager gets its average back, the model memory the plans
    address (``pinned``) gets its live values back, and so do the model's ``current`` tensors
    (by name, cast to their dtypes) where they are new. Returns the names that were replaced
    and those whose current tensor is missing or has another shape (not restored).
    """
    replaced, lost = [], []
    for index, (plan, _) in enumerate(runs):
        old = _pinned_views(plan, pinned[index])
        if backups is None:  # exchanged: the old model memory holds the average, the shadows the live values
            live = [shadow.clone() for shadow in plan.shadows]
            torch._foreach_copy_(plan.shadows, old)
        else:
            live = backups[index][0].shadows
        torch._foreach_copy_(old, live)
        for name, previous, value in zip(plan.names, old, live):
            tensor = current.get(name)
            if tensor is None or tensor.shape != value.shape:
                lost.append(name)
            elif (tensor.data_ptr(), tensor.dtype, tensor.device) != (previous.data_ptr(), previous.dtype, previous.device):
                replaced.append(name)
                tensor.copy_(value)
    return replaced, lost
