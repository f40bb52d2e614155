"""The ``cpu`` backend: the fused C++ kernel (``csrc/cpu``), one parallel pass over the plan."""

from __future__ import annotations

import torch

from .. import ops  # ImportError without the compiled extension: the registry reports it
from ..methods import Method
from ..plan import Plan

# Not used by the CPU kernel (it splits the element range itself), but part of the op's contract.
_BLOCK_ELEMS = 1 << 16


class CpuBackend:
    name = "cpu"

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None if device.type == "cpu" else f"runs on CPU tensors, not {device.type}"

    def update(self, plan: Plan, method: Method, n_averaged: torch.Tensor, bump: bool, rounding_seed: int = -1) -> None:
        plan.stage()
        ops.update_(
            plan.flats,
            plan.readable_models,
            plan.tensor_table(),
            plan.block_table(_BLOCK_ELEMS),
            n_averaged,
            method.code,
            *method.params,
            bump,
            rounding_seed,
        )
