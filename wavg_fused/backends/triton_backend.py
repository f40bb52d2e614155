"""The ``triton`` backend: the one-launch Triton kernel (``wavg_fused/triton/kernel.py``) over the
shared plan. It needs no compiler at install time and runs wherever Triton does; on the CPU it
runs only under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the tests cover it
on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

from ..methods import Method
from ..plan import Plan
from ..triton import kernel  # ImportError without Triton: the registry reports it

# NOTE: 4096 elements and 8 warps per program match the CUDA kernel's block (16 elements a
# thread at 256 threads); not yet tuned on a GPU. The interpreter runs each program in Python,
# so it gets large blocks (fewer programs) to keep the tests fast.
_GPU_BLOCK, _GPU_WARPS = 4096, 8
_INTERPRETER_BLOCK = 2048


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend:
    name = "triton"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if device.type == "cpu":
            return None if _interpreting() else "runs on CUDA tensors (on the CPU only with TRITON_INTERPRET=1)"
        return f"runs on CUDA tensors, not {device.type}"

    def update(self, plan: Plan, method: Method, n_averaged: torch.Tensor, bump: bool, rounding_seed: int = -1) -> None:
        block = _INTERPRETER_BLOCK if plan.device.type == "cpu" else _GPU_BLOCK
        cached = plan.backend_cache.get(self.name)
        if cached is None or cached[0] != method.params:
            flat_bases = torch.tensor([f.data_ptr() for f in plan.flats] or [0], dtype=torch.int64)
            params = torch.tensor(method.params, dtype=torch.float64)
            cached = plan.backend_cache[self.name] = (method.params, flat_bases.to(plan.device), params.to(plan.device))
        _, flat_bases, params = cached
        plan.stage()
        kernel.launch(
            plan.tensor_table(), plan.block_table(block), flat_bases, params, n_averaged, plan.workspace,
            method.code, rounding_seed, bump, block, _GPU_WARPS,
        )
