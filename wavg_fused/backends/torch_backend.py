"""The always-available backend: grouped ``torch._foreach_*`` calls over the plan, any device.

Tensors are grouped once per plan by (role, dtypes, model device) so that an update is a
handful of foreach calls. The step weight stays on the device: it is written into a persistent
0-dim tensor per compute dtype whose expanded views are the ``weights`` of
``_foreach_lerp_`` (a 0-dim tensor passed as a Scalar would be read on the host).
16-bit tensors are averaged in float32 (float64 for float64) and rounded once, like the kernels;
that costs temporary copies, which the fused backends avoid. An fp32 average of a 16-bit model
keeps a persistent fp32 buffer per model tensor to widen it into (model-sized memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..methods import Method
from ..plan import MODE_COPY_TO_MODEL, NONFINITE_SLOT, ROLE_AVERAGE, Plan
from ..rounding import stochastic_round_bf16


def compute_dtype(shadow_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if shadow_dtype == torch.float64 else torch.float32


@dataclass
class _Group:
    shadows: list[torch.Tensor]
    models: list[torch.Tensor]
    offsets: list[int] = field(default_factory=list)  # element offsets in storage: keys of stochastic rounding
    weights: list[torch.Tensor] = field(default_factory=list)  # expanded views of one 0-dim weight
    direct: bool = True  # shadows and models already have the compute dtype and device
    # Shadows in the compute dtype, models not (an fp32 average of a bf16 model): the models are
    # widened into these persistent buffers with one grouped copy instead of a cast per tensor.
    widened: list[torch.Tensor] | None = None


@dataclass
class _Prepared:
    copies: list[_Group]
    averages: list[_Group]
    weight_by_dtype: dict[torch.dtype, torch.Tensor]


def _prepare(plan: Plan) -> _Prepared:
    grouped: dict[tuple, _Group] = {}
    for shadow, model, role, offset in zip(plan.shadows, plan.models, plan.roles, plan.shadow_offsets):
        if shadow.numel() == 0:
            continue
        group = grouped.setdefault((role, shadow.dtype, model.dtype, model.device), _Group([], []))
        group.shadows.append(shadow)
        group.models.append(model)
        group.offsets.append(offset)

    copies, averages, weights = [], [], {}
    for (role, shadow_dtype, model_dtype, model_device), group in grouped.items():
        if role != ROLE_AVERAGE:
            copies.append(group)
            continue
        opmath = compute_dtype(shadow_dtype)
        weight = weights.setdefault(opmath, torch.ones((), dtype=opmath, device=plan.device))
        group.weights = [weight.expand(s.shape) for s in group.shadows]
        group.direct = shadow_dtype == opmath and model_dtype == opmath and model_device == plan.device
        if not group.direct and shadow_dtype == opmath:
            group.widened = [torch.empty_like(s) for s in group.shadows]
        averages.append(group)
    return _Prepared(copies, averages, weights)


class TorchBackend:
    """Pure PyTorch; works on every device PyTorch supports."""

    name = "torch"

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def prepare(self, plan: Plan) -> None:
        self._prepared(plan)

    def _prepared(self, plan: Plan) -> _Prepared:
        prepared = plan.backend_cache.get(self.name)
        if prepared is None:
            prepared = plan.backend_cache[self.name] = _prepare(plan)
        return prepared

    def update(self, plan: Plan, method: Method, n_averaged: torch.Tensor, bump: bool, rounding_seed: int = -1,
               guard: bool = False, n_skipped: torch.Tensor | None = None, staged: bool = False) -> None:
        prepared = self._prepared(plan)
        if not guard:
            self._write(prepared, plan, method, n_averaged, rounding_seed)
            if bump:
                n_averaged.add_(1)
            return
        # No kernel to stop early: write the update, then select the old values back where the
        # flag says skip (a copy of the shadows and one torch.where per tensor, the fallback's price)
        flag = plan.workspace[NONFINITE_SLOT]
        skip = flag != 0
        shadows = [s for group in prepared.copies + prepared.averages for s in group.shadows]
        before = [s.clone() for s in shadows]
        self._write(prepared, plan, method, n_averaged, rounding_seed)
        for shadow, old in zip(shadows, before):
            torch.where(skip, old, shadow, out=shadow)
        if bump:
            n_averaged.sub_(flag).add_(1)
        if n_skipped is not None:
            n_skipped.add_(flag)
        flag.zero_()

    def check_nonfinite(self, plan: Plan) -> None:
        models = [m for group in self._prepared(plan).averages for m in group.models]
        if models:  # max |x| propagates NaN and is Inf for an Inf
            largest = torch.stack([norm.to(plan.device, torch.float32) for norm in torch._foreach_norm(models, math.inf)])
            found = ~torch.isfinite(largest).all()
            plan.workspace[NONFINITE_SLOT : NONFINITE_SLOT + 1].bitwise_or_(found.to(torch.int32))

    def _write(self, prepared: _Prepared, plan: Plan, method: Method, n_averaged: torch.Tensor, rounding_seed: int) -> None:
        if prepared.averages:
            step_weight = method.step_weight(n_averaged)
            for weight in prepared.weight_by_dtype.values():
                weight.copy_(step_weight)
        for group in prepared.copies:
            torch._foreach_copy_(group.shadows, group.models)
        for group in prepared.averages:
            if group.direct:
                torch._foreach_lerp_(group.shadows, group.models, group.weights)
                continue
            if group.widened is not None:
                torch._foreach_copy_(group.widened, group.models)
                torch._foreach_lerp_(group.shadows, group.widened, group.weights)
                continue
            opmath = group.weights[0].dtype
            shadows = [s.to(opmath) for s in group.shadows]
            models = [m.to(device=plan.device, dtype=opmath) for m in group.models]
            torch._foreach_lerp_(shadows, models, group.weights)
            if rounding_seed >= 0 and group.shadows[0].dtype == torch.bfloat16:
                for shadow, value, offset in zip(group.shadows, shadows, group.offsets):
                    shadow.copy_(stochastic_round_bf16(value, rounding_seed, n_averaged, offset))
                continue
            torch._foreach_copy_(group.shadows, shadows)

    def transfer(self, plan: Plan, mode: int) -> None:
        pairs = [(s, m) for s, m in zip(plan.shadows, plan.readable_models) if s.numel()]
        if mode == MODE_COPY_TO_MODEL:
            torch._foreach_copy_([m for _, m in pairs], [s for s, _ in pairs])
            return
        # swap, equal dtypes: three grouped copies through model-sized temporaries (the fused
        # backends need none)
        models, shadows = [m for _, m in pairs], [s for s, _ in pairs]
        saved = [torch.empty_like(m) for m in models]
        torch._foreach_copy_(saved, models)
        torch._foreach_copy_(models, shadows)
        torch._foreach_copy_(shadows, saved)
