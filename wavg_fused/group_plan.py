"""One launch's tables for several averages of one model (``AveragerGroup``): the members' plans
on one device merged so a kernel reads each model tensor once and writes every member's shadow.

The group table has one row per (model tensor, member), member ``k``'s row of tensor ``t`` at
``t * K + k``: the member plan's own row (``plan.COLUMNS``), its storage-buffer index shifted into
the concatenation of every member's buffers; a row of zeros (no elements) where member ``k`` does
not keep tensor ``t`` (``exclude=``). Tensors follow the first member that keeps them. The block
table addresses tensors, over each tensor's elements.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .plan import COLUMNS, Plan, block_table, cached_tensors

__all__ = ["GroupPlan", "MAX_MEMBERS", "MAX_FLATS"]

MAX_MEMBERS = 8  # csrc/group_args.h kMaxGroupMembers
MAX_FLATS = 16  # csrc/wavg_rule.h kMaxFlats: the CUDA kernel takes the buffers' addresses by value
_FLAT = COLUMNS.index("flat")


class GroupPlan:
    """The merged tables of ``plans`` (one per member, all on one device), built once.

    >>> import torch, wavg_fused as wf
    >>> model = torch.nn.Linear(2, 2)
    >>> group = wf.AveragerGroup(model, {"a": wf.EMA(0.9), "b": wf.SWA()}, exclude=())
    >>> plans = [runs[0][0] for runs in group._engine.all_runs(model)]
    >>> GroupPlan(plans).table.shape  # 2 tensors x 2 members, one row each
    torch.Size([4, 9])
    """

    def __init__(self, plans: Sequence[Plan]) -> None:
        if not 1 <= len(plans) <= MAX_MEMBERS:
            raise ValueError(f"a group launch takes 1 to {MAX_MEMBERS} members, got {len(plans)}")
        self.plans = list(plans)  # kept alive: the table addresses their buffers and staged copies
        self.device = plans[0].device
        members = len(plans)
        position: dict[str, int] = {}
        for plan in plans:
            for name in plan.names:
                position.setdefault(name, len(position))
        self.names = list(position)
        self.numels = [0] * len(self.names)
        self.flats: list[torch.Tensor] = []
        table = torch.zeros(len(self.names) * members, len(COLUMNS), dtype=torch.int64)
        for k, plan in enumerate(plans):
            rows = plan.host_tensor_table().clone()
            rows[:, _FLAT] = torch.where(rows[:, _FLAT] >= 0, rows[:, _FLAT] + len(self.flats), rows[:, _FLAT])
            self.flats.extend(plan.flats)
            where = [position[name] for name in plan.names]
            if where:
                table[torch.tensor(where, dtype=torch.int64) * members + k] = rows
            for t, numel in zip(where, plan.numels):
                self.numels[t] = max(self.numels[t], numel)
        self.table = table.to(self.device)
        self.workspace = torch.zeros(2, dtype=torch.int32, device=self.device)  # [0]: finished blocks
        self._blocks: dict[int, torch.Tensor] = {}
        self.backend_cache: dict[str, object] = {}  # a backend's derived data (``Plan.backend_cache``)
        self._streams_seen: set[int] = set()
        self._memory_version = (0, 0)

    def block_table(self, block_elems: int) -> torch.Tensor:
        """(tensor index, start element) of each ``block_elems`` piece of the model's tensors."""
        if block_elems not in self._blocks:
            self._blocks[block_elems] = block_table(self.numels, block_elems, self.device)
        return self._blocks[block_elems]

    def mark_stream(self) -> None:
        """After a launch on a CUDA stream: the allocator learns the stream uses the group's
        tables (``Plan.mark_stream`` does the same for the members' plans)."""
        if self.device.type != "cuda" or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return
        memory = self.device_memory()
        version = (len(self._blocks), len(memory))  # tables added since: record them too
        if version != self._memory_version:
            self._memory_version = version
            self._streams_seen.clear()
        stream = torch.cuda.current_stream(self.device)
        if stream.stream_id in self._streams_seen:
            return
        self._streams_seen.add(stream.stream_id)
        for tensor in memory:
            tensor.record_stream(stream)

    def device_memory(self) -> list[torch.Tensor]:
        """The group's own tensors on its device: tables, workspace and what backends cached."""
        cached = [t for t in cached_tensors(self.backend_cache) if t.device == self.device]
        return [self.table, self.workspace, *self._blocks.values(), *cached]
