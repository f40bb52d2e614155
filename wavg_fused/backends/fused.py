"""The compiled backends: ``cpu`` (``csrc/cpu``) and ``cuda`` (``csrc/cuda``), one op call per update,
and ``cuda-emulated``, a test tool that runs the CUDA kernels' code on CPU tensors.

``cpu`` and ``cuda`` call ``torch.ops.wavg_fused.update_`` with the plan's tables; the dispatcher
picks the CPU or CUDA kernel from the tensors' device. ``cuda-emulated`` calls
``update_emulated_``, the CUDA kernels' per-block code (``csrc/cuda/update_blocks.h``) run block by
block on the CPU over the tables the ``cuda`` backend uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .. import ops  # ImportError without the compiled extension: the registry reports it
from ..group_plan import GroupPlan
from ..methods import Method
from ..plan import MODE_AVERAGE, MODE_CHECK, Plan

try:
    from .._C import cpu_bind_update as _bind_update
    from .._C import cpu_update_if_unmoved as _update_if_unmoved
except ImportError:  # an extension built before them: the watch, then the bound op
    _bind_update = _update_if_unmoved = None


class _FusedBackend:
    name: str
    device_type: str
    block_elems: int
    op_name = "wavg_fused::update_"
    group_op_name = "wavg_fused::update_group_"
    _launch: Callable[..., None] = staticmethod(ops.update_)
    _launch_group: Callable[..., None] = staticmethod(ops.update_group_)

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type != self.device_type:
            return f"runs on {self.device_type} tensors, not {device.type}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(self.op_name, self.device_type.upper()):
            return f"the compiled extension has no {self.device_type} kernel for {self.op_name} (built without it)"
        return None

    def prepare(self, plan: Plan) -> None:
        plan.tensor_table()
        plan.block_table(self.block_elems)

    def update(self, plan: Plan, method: Method, n_averaged: torch.Tensor, bump: bool, rounding_seed: int = -1,
               guard: bool = False, n_skipped: torch.Tensor | None = None, staged: bool = False) -> None:
        if not staged:
            plan.stage()
        self._launch(
            plan.flats,
            plan.tensor_table(),
            plan.block_table(self.block_elems),
            n_averaged,
            plan.workspace,
            method.code,
            list(method.params),
            bump,
            rounding_seed,
            MODE_AVERAGE,
            guard,
            n_skipped,
        )

    def bound_update(self, plan: Plan, method: Method, n_averaged: torch.Tensor,
                     rounding_seed: int = -1) -> Callable[[], None]:
        """``update(plan, method, n_averaged, bump=True, rounding_seed)`` of a plan with nothing to
        stage, as a call with its arguments bound (``Engine.launch`` keeps it while they hold)."""
        # the op overload itself, not ops.update_: that Python frame and its list copies were 3 of
        # the 12 us a 1-tensor model's update took on this 2-core CPU
        op = getattr(torch.ops.wavg_fused, self.op_name.split("::")[1]).default
        launch = functools.partial(
            op, list(plan.flats), plan.tensor_table(), plan.block_table(self.block_elems), n_averaged,
            plan.workspace, method.code, list(method.params), True, rounding_seed, MODE_AVERAGE, False, None,
        )
        if plan.device.type != "cuda":
            return launch

        def launch_and_mark() -> None:
            launch()
            plan.mark_stream()

        return launch_and_mark

    def can_update_group(self) -> bool:
        """Whether the extension has this backend's group op (one built before it does not)."""
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(self.group_op_name, self.device_type.upper())
        except RuntimeError:  # no such op
            return False

    def update_group(self, group: GroupPlan, methods: list[Method], counters: list[torch.Tensor], flags: list[int],
                     rounding_seeds: list[int]) -> None:
        """Every member of ``group`` in one launch (the members' plans staged by the caller);
        ``flags`` as ``ops.update_group_``."""
        params = [p for method in methods for p in (list(method.params) + [0.0] * 4)[:4]]
        self._launch_group(group.flats, group.table, group.block_table(self.block_elems), counters, group.workspace,
                           [method.code for method in methods], params, flags, rounding_seeds)

    def check_nonfinite(self, plan: Plan) -> None:
        plan.stage()
        self.transfer(plan, MODE_CHECK)

    def transfer(self, plan: Plan, mode: int) -> None:
        # the modes that read no method: copy_to, swap, and the non-finite check
        self._launch(plan.flats, plan.tensor_table(), plan.block_table(self.block_elems), plan.spare_count,
                     plan.workspace, 0, [], False, -1, mode)


class CpuBackend(_FusedBackend):
    name = "cpu"
    device_type = "cpu"
    block_elems = 1 << 16  # unused by the CPU kernel, which splits the element range itself

    def bound_update_if_unmoved(self, plan: Plan, method: Method, n_averaged: torch.Tensor,
                                rounding_seed: int = -1) -> Callable[[object], bool] | None:
        """``bound_update``'s launch (a plan with nothing to stage) behind the address watch, in one parallel region: the
        returned call takes an ``AddressWatch.record`` and returns False, having written nothing,
        if a watched slot moved (``csrc/cpu/update_if_unmoved.cpp``). None where the extension
        predates it."""
        if _bind_update is None:
            return None
        bound = _bind_update(list(plan.flats), plan.tensor_table(), n_averaged, method.code,
                             [float(p) for p in method.params], rounding_seed)
        return functools.partial(_update_if_unmoved, bound)


class CudaBackend(_FusedBackend):
    name = "cuda"
    device_type = "cuda"
    block_elems = 4096  # must equal kBlockElems in csrc/cuda/update_blocks.h

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return super().unavailable_reason(device)


class CudaEmulatedBackend(_FusedBackend):
    """A test tool, not a way to average: the ``cuda`` backend's kernel code run on CPU tensors,
    block by block (lanes of a block in turn, blocks in parallel), over the same tensor and block
    tables, so CPU-only test runs cover its table decoding, dtype dispatch, vector and tail paths,
    modes, stochastic rounding and last-block bookkeeping. ``auto`` never picks it; ask for it by
    name (``backend="cuda-emulated"`` or ``WAVG_FUSED_BACKEND=cuda-emulated``). It cannot show real
    concurrency, the GPU's memory ordering, warp effects, timing, or nvcc's own code generation."""

    name = "cuda-emulated"
    device_type = "cpu"
    block_elems = CudaBackend.block_elems
    op_name = "wavg_fused::update_emulated_"
    group_op_name = "wavg_fused::update_group_emulated_"
    _launch = staticmethod(ops.update_emulated_)
    _launch_group = staticmethod(ops.update_group_emulated_)
