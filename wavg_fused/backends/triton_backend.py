"""The ``triton`` backend: the one-launch Triton kernel (``wavg_fused/triton/kernel.py``) over the
shared plan. It needs no compiler at install time and runs wherever Triton does; on the CPU it
runs only under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the tests cover it
on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

from ..methods import Method
from ..plan import MODE_AVERAGE, MODE_CHECK, Plan
from ..triton import kernel  # ImportError without Triton: the registry reports it

# NOTE: on a GPU the block follows the plan's typical (median) tensor size, between 1024 and 4096
# elements, so a model of many 1k-element tensors does not mask off 3/4 of every program; 4096
# with 8 warps matches the CUDA kernel (16 elements a thread). Not yet measured on a GPU: no
# session with one has run it. The interpreter runs each program in Python, so it gets large
# blocks (fewer programs) to keep the tests fast.
_INTERPRETER_BLOCK = 2048


def _gpu_config(numels: list[int]) -> tuple[int, int]:
    sizes = sorted(n for n in numels if n)
    typical = sizes[len(sizes) // 2] if sizes else 1
    block = min(4096, max(1024, 1 << (typical - 1).bit_length()))
    return block, max(4, block // 512)


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

    def _cached(self, plan: Plan, method_params: tuple[float, ...]) -> tuple:
        """(flat bases, the method's parameters, block, warps) on the plan's device, built once per
        plan and parameters (a check or transfer between updates does not rebuild the update's)."""
        cache = plan.backend_cache.get(self.name)
        if cache is None:
            flat_bases = torch.tensor([f.data_ptr() for f in plan.flats] or [0], dtype=torch.int64)
            config = (_INTERPRETER_BLOCK, 4) if plan.device.type == "cpu" else _gpu_config(plan.numels)
            cache = plan.backend_cache[self.name] = (flat_bases.to(plan.device), config, {})
        flat_bases, config, by_params = cache
        params = by_params.get(method_params)
        if params is None:
            if len(by_params) > 4:  # a method whose parameters keep changing: keep the cache small
                by_params.clear()
            host = torch.zeros(4, dtype=torch.float64)  # MethodParams: 4 slots, unused ones 0
            host[: len(method_params)] = torch.tensor(method_params, dtype=torch.float64)
            params = by_params[method_params] = host.to(plan.device)
        return (flat_bases, params, *config)

    def update(self, plan: Plan, method: Method, n_averaged: torch.Tensor, bump: bool, rounding_seed: int = -1,
               guard: bool = False, n_skipped: torch.Tensor | None = None, staged: bool = False) -> None:
        flat_bases, params, block, warps = self._cached(plan, tuple(method.params))
        if not staged:
            plan.stage()
        kernel.launch(
            plan.tensor_table(), plan.block_table(block), flat_bases, params, n_averaged, plan.workspace,
            method.code, rounding_seed, bump, block, warps, MODE_AVERAGE, guard, n_skipped,
        )

    def check_nonfinite(self, plan: Plan) -> None:
        plan.stage()
        self.transfer(plan, MODE_CHECK)

    def transfer(self, plan: Plan, mode: int) -> None:
        # the modes that read no method: copy_to, swap, and the non-finite check
        flat_bases, params, block, warps = self._cached(plan, ())
        kernel.launch(
            plan.tensor_table(), plan.block_table(block), flat_bases, params, plan.spare_count, plan.workspace,
            0, -1, False, block, warps, mode,
        )
