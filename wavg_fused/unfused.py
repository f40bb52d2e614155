"""The slow path for a user's own per-tensor ``avg_fn``: one Python call per tensor.

It reads ``n_averaged`` on the host once per update to decide whether to copy (as
``torch.optim.swa_utils.AveragedModel`` does). Built-in methods never come here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .plan import ROLE_COPY, Plan


def update_per_tensor(
    runs: Sequence[tuple[Plan, object]],
    avg_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    n_averaged: torch.Tensor,
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
    n_averaged.add_(1)
