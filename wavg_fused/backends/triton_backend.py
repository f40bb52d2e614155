"""The ``triton`` backend: the one-launch Triton kernel (``wavg_fused/triton/kernel.py``) over the
shared plan. It needs no compiler at install time and runs wherever Triton does; on the CPU it
runs only under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the tests cover it
on machines without a GPU.
"""

from __future__ import annotations

import os

import torch

from ..group_plan import GroupPlan
from ..methods import Method
from ..plan import MODE_AVERAGE, MODE_CHECK, Plan
from ..triton import kernel  # ImportError without Triton: the registry reports it

# NOTE: every (BLOCK, num_warps) is a compiled variant per kernel MODE (35-110 s each with
# Triton 3.6 on this 2-core machine), so the GPU gets two. Measured for sm_90 without a GPU
# (benchmarks/results/triton/variants-after-*.json): the update at 4096 elements / 8 warps
# (16 a thread, as the CUDA kernel) and at 1024 / 4 warps (8 a thread) stays under 128
# registers, so two blocks of 256 threads fit an SM at 4096 and more at 1024; no spills, no
# shared memory but the check's reduction. The update follows the plan's typical (median)
# tensor: 1024 up to 2048-element tensors (a model of many 1k tensors does not mask 3/4 of every
# program), 4096 above. Transfers and the check always use 4096 / 8: transfers are rare, the
# check reads one model tensor and is one variant. No GPU timings exist yet. The interpreter
# runs each program in Python, so it gets large blocks (fewer programs) to keep the tests fast.
_INTERPRETER_BLOCK = 2048
_SMALL, _LARGE = (1024, 4), (4096, 8)
# The group kernel runs every member's block in one program, so a program of 1024 elements does
# members x 1024 elements of work (never fewer than 2048) and a model of small tensors masks
# little: one block size for every group (one variant, and one more when a member rounds at random).
_GROUP = _SMALL
_MEMBER_TABLES = 32  # member tables kept per group (one per distinct set of members' scalars)


def _gpu_config(numels: list[int], mode: int = MODE_AVERAGE) -> tuple[int, int]:
    if mode != MODE_AVERAGE:
        return _LARGE
    sizes = sorted(n for n in numels if n)
    typical = sizes[len(sizes) // 2] if sizes else 1
    return _SMALL if typical <= 2048 else _LARGE


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

    def _cached(self, plan: Plan) -> tuple:
        """(flat bases on the plan's device, whether every bf16 shadow starts at a multiple of 4
        elements), built once per plan. The method's parameters are kernel arguments, by value."""
        cache = plan.backend_cache.get(self.name)
        if cache is None:
            flat_bases = torch.tensor([f.data_ptr() for f in plan.flats] or [0], dtype=torch.int64)
            # stochastic rounding draws one Philox call per 4 elements of a block: the storage's
            # 16-byte aligned offsets guarantee whole groups (checked, not assumed)
            grouped = all(offset % 4 == 0 for shadow, offset in zip(plan.shadows, plan.shadow_offsets)
                          if shadow.dtype == torch.bfloat16)
            cache = plan.backend_cache[self.name] = (flat_bases.to(plan.device), grouped)
        return cache

    def prepare(self, plan: Plan) -> None:
        self._cached(plan)
        plan.tensor_table()
        for mode in (MODE_AVERAGE, MODE_CHECK):
            plan.block_table(self._config(plan, mode)[0])

    def _config(self, plan: Plan, mode: int) -> tuple[int, int]:
        return (_INTERPRETER_BLOCK, 4) if plan.device.type == "cpu" else _gpu_config(plan.numels, mode)

    def _check_rounding(self, plan: Plan, rounding_seed: int) -> None:
        if rounding_seed >= 0 and not self._cached(plan)[1]:
            raise ValueError("triton backend: stochastic rounding needs bf16 shadows at offsets that are "
                             "multiples of 4 elements (ShadowStorage aligns them to 16 bytes)")

    def update(self, plan: Plan, method: Method, n_averaged: torch.Tensor, bump: bool, rounding_seed: int = -1,
               guard: bool = False, n_skipped: torch.Tensor | None = None, staged: bool = False) -> None:
        flat_bases, _ = self._cached(plan)
        self._check_rounding(plan, rounding_seed)
        block, warps = self._config(plan, MODE_AVERAGE)
        if not staged:
            plan.stage()
        kernel.launch(
            plan.tensor_table(), plan.block_table(block), flat_bases, n_averaged, plan.workspace, method.code,
            method.params, rounding_seed, bump, block, warps, MODE_AVERAGE, guard, n_skipped,
        )

    def can_update_group(self) -> bool:
        return True

    def update_group(self, group: GroupPlan, methods: list[Method], counters: list[torch.Tensor], flags: list[int],
                     rounding_seeds: list[int]) -> None:
        """Every member of ``group`` in one launch of the group kernel (the members' plans staged
        by the caller); ``flags[k]``: bit 1 bumps member k's counter, bit 2 writes member k."""
        stochastic = False
        for plan, flag, seed in zip(group.plans, flags, rounding_seeds):
            if flag & 2:
                self._check_rounding(plan, seed)
                stochastic = stochastic or seed >= 0
        flat_bases, member_table = self._group_tables(group, methods, counters, flags, rounding_seeds)
        block, warps = (_INTERPRETER_BLOCK, 4) if group.device.type == "cpu" else _GROUP
        kernel.launch_group(group.table, group.block_table(block), flat_bases, member_table, group.workspace,
                            counters, flags, stochastic, block, warps)

    def _group_tables(self, group: GroupPlan, methods, counters, flags, rounding_seeds) -> tuple:
        """(the group's flat bases, its member table for these scalars) on the group's device. A
        member table is built once per distinct set of scalars (host values and counter addresses:
        no device value is read) and kept, so the steady state copies nothing to the device and a
        captured CUDA graph keeps the table it launched with; past ``_MEMBER_TABLES`` distinct sets
        (parameters changed every call) each call copies its own."""
        cache = group.backend_cache.get(self.name)
        if cache is None:
            flat_bases = torch.tensor([f.data_ptr() for f in group.flats] or [0], dtype=torch.int64)
            cache = group.backend_cache[self.name] = (flat_bases.to(group.device), {})
        flat_bases, tables = cache
        key = kernel.member_rows([m.code for m in methods], [m.params for m in methods], rounding_seeds, flags,
                                 counters)
        table = tables.get(key)
        if table is None:
            host = torch.tensor(key, dtype=torch.int64).reshape(len(methods), len(kernel.MEMBER_COLUMNS))
            table = host.to(group.device, non_blocking=True)
            if len(tables) < _MEMBER_TABLES:
                tables[key] = table
        return flat_bases, table

    def check_nonfinite(self, plan: Plan) -> None:
        plan.stage()
        self.transfer(plan, MODE_CHECK)

    def transfer(self, plan: Plan, mode: int) -> None:
        # the modes that read no method: copy_to, swap, and the non-finite check
        flat_bases, _ = self._cached(plan)
        block, warps = self._config(plan, mode)
        kernel.launch(
            plan.tensor_table(), plan.block_table(block), flat_bases, plan.spare_count, plan.workspace,
            0, (), -1, False, block, warps, mode,
        )


def gpu_variants() -> list[tuple[str, object, tuple, dict]]:
    """(name, kernel, args, kwargs) of one launch per compiled variant a GPU uses: every
    (MODE, STOCHASTIC, BLOCK, num_warps) the backend can launch, and the group kernel's
    STOCHASTIC variants, with arguments built by ``kernel.launch_args`` and
    ``kernel.launch_group_args`` (the launch paths themselves). Nothing else a launch passes is specialised,
    so these are all the compilations a GPU run can cause. For compiling without a GPU."""
    from ..plan import COLUMNS, MODE_SWAP

    table = torch.zeros(1, len(COLUMNS), dtype=torch.int64)
    n = torch.zeros((), dtype=torch.int64)
    workspace = torch.zeros(2, dtype=torch.int32)
    out = []
    for (block, warps), mode, seed, name in [
        (_SMALL, MODE_AVERAGE, -1, "update"), (_SMALL, MODE_AVERAGE, 7, "update-stochastic"),
        (_LARGE, MODE_AVERAGE, -1, "update"), (_LARGE, MODE_AVERAGE, 7, "update-stochastic"),
        (_gpu_config([], MODE_SWAP), MODE_SWAP, -1, "transfer"), (_gpu_config([], MODE_CHECK), MODE_CHECK, -1, "check"),
    ]:
        blocks = torch.zeros(3, 2, dtype=torch.int64)
        args, kwargs = kernel.launch_args(table, blocks, table[0], n, workspace, 0, (0.999,), seed, mode == MODE_AVERAGE,
                                          block, warps, mode)
        out.append((f"{name}-{block}", kernel._wavg_update_kernel, args, kwargs))
    members = torch.zeros(2, len(kernel.MEMBER_COLUMNS), dtype=torch.int64)
    for stochastic, name in [(False, "group"), (True, "group-stochastic")]:
        blocks = torch.zeros(3, 2, dtype=torch.int64)
        args, kwargs = kernel.launch_group_args(torch.zeros(2, len(COLUMNS), dtype=torch.int64), blocks, table[0],
                                                members, workspace, [3, 3], stochastic, *_GROUP)
        out.append((f"{name}-{_GROUP[0]}", kernel._wavg_group_kernel, args, kwargs))
    return out
