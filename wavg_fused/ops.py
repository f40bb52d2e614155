"""Typed Python wrappers of the compiled ops, with their fake (meta) implementations.

Importing this module loads ``wavg_fused._C`` (the op registrations): the installed extension, or
one built on first use (``wavg_fused._extension``), and raises ``ImportError`` when there is none;
the backend registry records that as the reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._extension import load as _load_extension
from .plan import COLUMNS

__all__ = ["update_", "update_emulated_", "update_group_", "update_group_emulated_"]

_C = _load_extension()  # registers torch.ops.wavg_fused.*; may compile it, once per torch and machine


def update_(
    flats: Sequence[torch.Tensor],
    table: torch.Tensor,
    blocks: torch.Tensor,
    n_averaged: torch.Tensor,
    workspace: torch.Tensor,
    method: int,
    params: Sequence[float],
    bump: bool,
    rounding_seed: int = -1,
    action: int = 0,
    guard: bool = False,
    n_skipped: torch.Tensor | None = None,
) -> None:
    """Update every tensor of a plan in one fused pass (see ``wavg_fused.plan`` for the tables).

    The model tensors are read at the addresses in ``table``; the caller keeps them alive and
    rebuilds the table when one of them moves (``Averager`` does both). ``action`` (``plan.MODE_*``)
    0 is the update; 1 writes the shadows into the model tensors (cast to their dtypes) and 2
    exchanges the two (equal dtypes): writes to memory the op's arguments do not name, whose
    aliasing ``wavg_fused.swap`` owns. Neither reads the method nor bumps ``n_averaged``.

    >>> import torch, wavg_fused as wf
    >>> model = torch.nn.Linear(3, 2)
    >>> avg = wf.Averager(model, wf.EMA(0.5), backend="cpu")
    >>> avg.update(model)  # calls update_ once
    >>> torch.equal(avg.module.weight, model.weight)
    True
    """
    torch.ops.wavg_fused.update_.default(
        list(flats), table, blocks, n_averaged, workspace, method, list(params), bump, rounding_seed, action,
        guard, n_skipped,
    )


def update_emulated_(
    flats: Sequence[torch.Tensor],
    table: torch.Tensor,
    blocks: torch.Tensor,
    n_averaged: torch.Tensor,
    workspace: torch.Tensor,
    method: int,
    params: Sequence[float],
    bump: bool,
    rounding_seed: int = -1,
    action: int = 0,
    guard: bool = False,
    n_skipped: torch.Tensor | None = None,
) -> None:
    """``update_`` run by the CUDA kernels' code on the CPU, block by block over the cuda
    backend's tables (``blocks`` of ``CudaBackend.block_elems``), all tensors on the CPU: the
    ``cuda-emulated`` test backend. Same arguments and effects as ``update_``."""
    torch.ops.wavg_fused.update_emulated_.default(
        list(flats), table, blocks, n_averaged, workspace, method, list(params), bump, rounding_seed, action,
        guard, n_skipped,
    )


def update_group_(
    flats: Sequence[torch.Tensor],
    table: torch.Tensor,
    blocks: torch.Tensor,
    counters: Sequence[torch.Tensor],
    workspace: torch.Tensor,
    methods: Sequence[int],
    params: Sequence[float],
    flags: Sequence[int],
    rounding_seeds: Sequence[int],
) -> None:
    """Update several averages of one model in one pass, reading each model tensor once
    (``wavg_fused.group_plan`` builds the tables: one row per model tensor and member).
    Per member ``k``: ``counters[k]`` is its ``n_averaged``, ``params[4k:4k+4]`` its method's
    parameters, ``flags[k]`` 1 to bump the counter and 2 to write the member in this update.

    >>> import torch, wavg_fused as wf
    >>> model = torch.nn.Linear(3, 2)
    >>> group = wf.AveragerGroup(model, {"fast": wf.EMA(0.9), "slow": wf.EMA(0.99)}, backend="cpu")
    >>> group.update(model)  # calls update_group_ once
    >>> int(group["fast"].n_averaged), int(group["slow"].n_averaged)
    (1, 1)
    """
    _call_group(torch.ops.wavg_fused.update_group_.default, flats, table, blocks, counters, workspace, methods, params,
                flags, rounding_seeds)


def update_group_emulated_(*args, **kwargs) -> None:
    """``update_group_`` (same arguments) run by the CUDA kernels' code on the CPU (the
    ``cuda-emulated`` backend)."""
    _call_group(torch.ops.wavg_fused.update_group_emulated_.default, *args, **kwargs)


def _call_group(op, flats, table, blocks, counters, workspace, methods, params, flags, rounding_seeds) -> None:
    op(list(flats), table, blocks, list(counters), workspace, list(methods), list(params), list(flags),
       list(rounding_seeds))


def _update_fake(
    flats, table, blocks, n_averaged, workspace, method, params, bump, rounding_seed, action=0, guard=False, n_skipped=None
) -> None:
    # The op writes in place and returns nothing; under torch.compile only the shapes of the
    # tables and the counter can be checked, the addresses inside them cannot.
    torch._check(table.dim() == 2 and table.shape[1] == len(COLUMNS), lambda: "table must be [T, len(COLUMNS)]")
    torch._check(blocks.dim() == 2 and blocks.shape[1] == 2, lambda: "blocks must be [B, 2]")
    torch._check(n_averaged.numel() == 1 and n_averaged.dtype == torch.long, lambda: "n_averaged: one int64")
    torch._check(workspace.numel() >= 1 and workspace.dtype == torch.int32, lambda: "workspace: int32")
    torch._check(action in (0, 1, 2, 3) and (action == 0 or not bump), lambda: "action 0, 1, 2 or 3; only 0 bumps")
    torch._check(not (guard or action == 3) or workspace.numel() >= 2, lambda: "the guard needs a 2-slot workspace")
    torch._check(n_skipped is None or (n_skipped.numel() == 1 and n_skipped.dtype == torch.long), lambda: "n_skipped: one int64")
    return None


torch.library.register_fake("wavg_fused::update_")(_update_fake)
if hasattr(torch.ops.wavg_fused, "update_emulated_"):  # an extension built before it lacks the op
    torch.library.register_fake("wavg_fused::update_emulated_")(_update_fake)


def _update_group_fake(flats, table, blocks, counters, workspace, methods, params, flags, rounding_seeds) -> None:
    members = len(methods)
    torch._check(1 <= members <= 8, lambda: "1 to 8 members")
    torch._check(len(counters) == members and len(flags) == members and len(rounding_seeds) == members
                 and len(params) == 4 * members, lambda: "one counter, flag and seed and 4 params per member")
    torch._check(table.dim() == 2 and table.shape[1] == len(COLUMNS), lambda: "table must be [T * members, len(COLUMNS)]")
    torch._check(blocks.dim() == 2 and blocks.shape[1] == 2, lambda: "blocks must be [B, 2]")
    return None


for _name in ("update_group_", "update_group_emulated_"):
    if hasattr(torch.ops.wavg_fused, _name):  # an extension built before the group ops lacks them
        torch.library.register_fake(f"wavg_fused::{_name}")(_update_group_fake)
