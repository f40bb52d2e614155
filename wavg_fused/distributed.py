"""Checkpointing an ``Averager`` across ranks: sharded with ``torch.distributed.checkpoint`` (DCP),
or gathered into one full state dict for export.

The averager of an FSDP2 model holds this rank's shards as DTensors, so its ``state_dict()`` is
already what DCP wants: every rank writes its own shards, and a load reshards them into whatever
mesh the loading averager has (another world size, or a plain single-process model). Two things
need help, and this module gives it:

- ``AveragerState(averager)``: the averager as a DCP ``Stateful``, with ``_extra_state`` as a
  Python ``bytes`` object (so checkpoints from before that entry was padded to a fixed size load
  too) and ``staged=True`` for an atomic load. The averager itself also works as a ``Stateful``.
- ``full_state_dict(averager)``: every DTensor gathered (one tensor at a time), on rank 0 by
  default, in host memory; it loads into an ``Averager`` of the unsharded model, and into
  ``torch.optim.swa_utils.AveragedModel`` with ``strict=False``.

Replicated models (DDP, DataParallel) need none of this: every rank holds the same average, so
rank 0's ordinary ``state_dict()`` is the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .averager import Averager
from .sharded import is_dtensor

__all__ = ["AveragerState", "full_state_dict", "load_full_state_dict"]

_EXTRA_STATE = "_extra_state"


class AveragerState:
    """``averager`` as a ``torch.distributed.checkpoint`` ``Stateful``: pass it in the state dict
    given to ``dcp.save`` and ``dcp.load``.

    Saves the averager's shards from every rank (DTensors) and its replicated entries once; loads
    into an averager of any world size, a single-process one included. By default DCP reads
    straight into the averager's storage (no second copy of the average); it checks keys and
    sizes before it reads, so a mismatched checkpoint raises with the average untouched, but a
    read that fails part-way (I/O, a truncated file) leaves it half-loaded. ``staged=True`` makes
    the load atomic: DCP reads into a copy (one more shard-sized buffer per rank while loading),
    which ``Averager.load_state_dict`` validates and copies in only once everything was read.

    Examples:
        >>> import tempfile, torch, torch.distributed.checkpoint as dcp, wavg_fused as wf
        >>> from wavg_fused.distributed import AveragerState
        >>> model = torch.nn.Linear(4, 2)
        >>> avg = wf.Averager(model, wf.EMA(0.9)); avg.update(model)
        >>> path = tempfile.mkdtemp()
        >>> _ = dcp.save({"ema": AveragerState(avg)}, checkpoint_id=path)
        >>> fresh = wf.Averager(torch.nn.Linear(4, 2), wf.SWA())
        >>> dcp.load({"ema": AveragerState(fresh)}, checkpoint_id=path)
        >>> torch.equal(fresh.module.weight, avg.module.weight), fresh.method, int(fresh.n_averaged)
        (True, EMA(decay=0.9), 1)
    """

    def __init__(self, averager: Averager, *, staged: bool = False) -> None:
        if not isinstance(averager, Averager):
            raise TypeError(f"averager must be a wavg_fused.Averager, got {type(averager).__name__}")
        self.averager = averager
        self.staged = bool(staged)

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.averager.state_dict())
        if self.staged:  # DCP's load writes into what this returns: let it write into copies
            state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        if _EXTRA_STATE in state:  # as bytes: the size of older, unpadded entries varied with the count
            state[_EXTRA_STATE] = bytes(state[_EXTRA_STATE].cpu().tolist())
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state = dict(state_dict)
        extra = state.get(_EXTRA_STATE)
        if isinstance(extra, (bytes, bytearray)):
            state[_EXTRA_STATE] = torch.frombuffer(bytearray(extra), dtype=torch.uint8).clone()
        self.averager.load_state_dict(state)


def _rank() -> int:
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0


def full_state_dict(averager: Averager, *, rank0_only: bool = True, cpu_offload: bool = True) -> dict[str, Any]:
    """The averager's state dict with every DTensor gathered into a full tensor, for export.

    A collective: call it on every rank of the averager's mesh. Tensors are gathered one at a
    time (peak extra memory: one full tensor on the device) and, with ``cpu_offload``, moved to
    host memory; with ``rank0_only`` only rank 0 keeps them and the other ranks get ``{}``.
    Plain entries (replicated buffers, ``n_averaged``, ``_extra_state``) are copied, so saving
    the result writes only its own bytes. The result loads into an ``Averager`` of the unsharded
    model (``load_state_dict``, strict) and ``load_full_state_dict`` puts it back into a sharded one.

    Examples:
        >>> import torch, wavg_fused as wf
        >>> from wavg_fused.distributed import full_state_dict
        >>> model = torch.nn.Linear(4, 2)
        >>> avg = wf.Averager(model, wf.SWA()); avg.update(model)
        >>> full = full_state_dict(avg)
        >>> sorted(full), torch.equal(full["module.weight"], model.weight)
        (['_extra_state', 'module.bias', 'module.weight', 'n_averaged'], True)
    """
    if not isinstance(averager, Averager):
        raise TypeError(f"averager must be a wavg_fused.Averager, got {type(averager).__name__}")
    keep = not rank0_only or _rank() == 0
    full: dict[str, Any] = {}
    for key, value in averager.state_dict().items():
        if is_dtensor(value):
            value = value.full_tensor()  # every rank takes part, also those that keep nothing
        if not keep:
            continue
        if isinstance(value, torch.Tensor):  # a copy: a view would drag the whole flat buffer into torch.save
            value = value.detach().to("cpu", copy=True) if cpu_offload else value.detach().clone()
        full[key] = value
    return full


def load_full_state_dict(averager: Averager, state_dict: Mapping[str, Any]) -> None:
    """Load a full (unsharded) state dict, e.g. from ``full_state_dict`` or a single-process
    ``Averager``, into an averager whose tensors may be DTensors: every rank passes the same
    full state dict and keeps its own shards of it (sliced locally: no collective).

    The same checks as ``Averager.load_state_dict`` (keys, global shapes, the method entry) run
    before anything is copied.

    Examples:
        >>> import torch, wavg_fused as wf
        >>> from wavg_fused.distributed import load_full_state_dict
        >>> model = torch.nn.Linear(4, 2)
        >>> avg = wf.Averager(model, wf.SWA()); avg.update(model)
        >>> other = wf.Averager(torch.nn.Linear(4, 2), wf.SWA())
        >>> load_full_state_dict(other, avg.state_dict()); torch.equal(other.module.weight, model.weight)
        True
    """
    if not isinstance(averager, Averager):
        raise TypeError(f"averager must be a wavg_fused.Averager, got {type(averager).__name__}")
    own = averager.state_dict(keep_vars=True)
    state = dict(state_dict)
    for key, value in state.items():
        template = own.get(key)
        if not (is_dtensor(template) and isinstance(value, torch.Tensor)) or is_dtensor(value):
            continue
        if tuple(value.shape) != tuple(template.shape):
            raise RuntimeError(
                f"load_full_state_dict: {key!r} has shape {tuple(value.shape)}, expected the full shape "
                f"{tuple(template.shape)}; nothing was loaded"
            )
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds the full tensor and slices its own piece
        value = value.to(device=template._local_tensor.device, dtype=template.dtype)
        state[key] = distribute_tensor(value, template.device_mesh, template.placements, src_data_rank=None)
    averager.load_state_dict(state)
