"""The slow path for a user's own ``avg_fn`` (one Python call per tensor) or ``multi_avg_fn``
(one call per device and dtype), as ``torch.optim.swa_utils.AveragedModel`` calls them.

Both read ``n_averaged`` on the host once per update to decide whether to copy (as
``AveragedModel`` does). Built-in methods never come here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .plan import ROLE_COPY, Plan


def update_per_tensor(
    runs: Sequence[tuple[Plan, object]],
    avg_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    n_averaged: torch.Tensor,
    bump: bool = True,
) -> None:
    first = bool(n_averaged == 0)
    for plan, _ in runs:
        counter = n_averaged.to(plan.device)
        for shadow, model, role in zip(plan.shadows, plan.models, plan.roles):
            model = model.detach().to(shadow.device)
            if first or role == ROLE_COPY:
                shadow.copy_(model)
            else:
                shadow.copy_(avg_fn(shadow, model, counter))
    if bump:
        n_averaged.add_(1)


def update_multi_tensor(
    runs: Sequence[tuple[Plan, object]],
    multi_avg_fn: Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], object],
    n_averaged: torch.Tensor,
) -> None:
    """``multi_avg_fn(averaged, model, n_averaged)`` once per (device, dtype) group of averaged
    tensors, in order of first appearance, as ``AveragedModel`` groups them. Copied tensors
    (integers; buffers unless ``use_buffers``) never reach it."""
    first = bool(n_averaged == 0)
    for plan, _ in runs:
        groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for shadow, model, role in zip(plan.shadows, plan.models, plan.roles):
            # a no-op cast unless the average is kept in another dtype (Averager's dtype=)
            model = model.detach().to(device=shadow.device, dtype=shadow.dtype)
            if first or role == ROLE_COPY:
                shadow.copy_(model)
                continue
            shadows, models = groups.setdefault(shadow.dtype, ([], []))
            shadows.append(shadow.detach())
            models.append(model)
        if groups:
            counter = n_averaged.to(plan.device)
            for shadows, models in groups.values():
                multi_avg_fn(shadows, models, counter)
    n_averaged.add_(1)
