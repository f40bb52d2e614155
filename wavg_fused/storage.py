"""Contiguous shadow storage: every shadow tensor is a view into one flat buffer per (device, dtype).

Views keep the model tensor's memory layout (channels_last stays channels_last; any dense
permutation is kept, other layouts become contiguous), start at an offset aligned to
``SLOT_ALIGN_BYTES`` (a cache line: no vector load or store of one tensor splits across two lines,
and no two tensors share one), and tied tensors share one slot.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ALIGN_BYTES", "SLOT_ALIGN_BYTES", "ShadowStorage", "named_tensors", "dense_strides", "pack_module"]

ALIGN_BYTES = 16  # what the kernels' vector loads need of both addresses (plan.FLAG_ALIGNED)
# Where each shadow starts in its flat buffer. 16 bytes put every other tensor of 1,000 fp32 on a
# 32-byte boundary, and each AVX-512 load and store of it across two cache lines (2,000x1k: the
# op 1-3% slower, same run).
SLOT_ALIGN_BYTES = 64
# Floating dtypes the kernels average (plan.DTYPE_CODES); pack_module's dtype= converts only these.
KERNEL_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters then buffers, tied tensors once (under their first name), in module order."""
    return list(module.named_parameters()) + list(module.named_buffers())


def dense_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """The strides PyTorch gives ``empty_like(tensor)``: the tensor's own if it is dense and
    non-overlapping (contiguous, channels_last, any permutation), else contiguous ones."""
    return torch.empty_like(tensor, device="meta").stride()


def aligned_offset(offset_elems: int, itemsize: int) -> int:
    """``offset_elems`` rounded up to the next SLOT_ALIGN_BYTES boundary for elements of ``itemsize``."""
    step = max(1, SLOT_ALIGN_BYTES // itemsize)
    return -(-offset_elems // step) * step


@dataclass
class ShadowStorage:
    """The flat buffers behind a shadow module. ``nbytes`` is tensor bytes plus padding only."""

    flats: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(default_factory=dict)
    tensor_bytes: int = 0  # bytes of the shadow tensors themselves: nbytes minus padding

    @property
    def nbytes(self) -> int:
        return sum(flat.numel() * flat.element_size() for flat in self.flats.values())

    def offset_of(self, tensor: torch.Tensor) -> int:
        """Element offset of ``tensor`` (a view this storage owns) in its flat buffer."""
        flat = self.flats[(tensor.device, tensor.dtype)]
        return (tensor.data_ptr() - flat.data_ptr()) // tensor.element_size()

    def owns(self, tensor: torch.Tensor) -> bool:
        flat = self.flats.get((tensor.device, tensor.dtype))
        if flat is None or tensor.numel() == 0:
            return flat is not None
        start = flat.data_ptr()
        end = start + flat.numel() * flat.element_size()
        return start <= tensor.data_ptr() < end


def copy_into_flats(
    tensors: dict[int, torch.Tensor],
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[ShadowStorage, dict[int, torch.Tensor]]:
    """Flat buffers (one per device and dtype) holding copies of ``tensors``, and the view of
    each (same keys) into them: aligned, with the tensor's dense layout. ``device`` and ``dtype``
    as in ``pack_module``."""
    layout: list[tuple[int, tuple, int]] = []  # (key, group, offset in elements)
    group_sizes: dict[tuple[torch.device, torch.dtype], int] = {}
    tensor_bytes = 0
    for key, tensor in tensors.items():
        # dtype= applies to the floating dtypes the kernels compute in; others (float8) keep theirs
        target_dtype = dtype if (dtype is not None and tensor.dtype in KERNEL_FLOATS) else tensor.dtype
        target_device = torch.device(device) if device is not None else tensor.device
        group = (target_device, target_dtype)
        itemsize = torch.empty((), dtype=target_dtype, device="meta").element_size()
        offset = aligned_offset(group_sizes.get(group, 0), itemsize)
        group_sizes[group] = offset + tensor.numel()
        layout.append((key, group, offset))
        tensor_bytes += tensor.numel() * itemsize

    flats = {}
    for group, size in group_sizes.items():
        itemsize = torch.empty((), dtype=group[1], device="meta").element_size()
        flats[group] = torch.zeros(aligned_offset(size, itemsize), dtype=group[1], device=group[0])
    # keyed by the allocated device, so "cuda" and "cuda:0" name the same buffer
    storage = ShadowStorage({(f.device, f.dtype): f for f in flats.values()}, tensor_bytes)

    views: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, group, offset in layout:
            tensor = tensors[key]
            views[key] = flats[group].as_strided(tensor.shape, dense_strides(tensor), offset)
            views[key].copy_(tensor)
    return storage, views


def pack_module(
    module: nn.Module,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ShadowStorage:
    """Move every parameter and buffer of ``module`` into flat storage, in place.

    ``device`` moves all tensors; ``dtype`` converts floating-point tensors only (integer
    buffers such as BatchNorm's ``num_batches_tracked`` keep their dtype). Parameters keep their
    identity (their ``.data`` is rebound), so ties between modules survive.

    >>> import torch, wavg_fused.storage as st
    >>> m = torch.nn.Linear(3, 5)
    >>> storage = st.pack_module(m)
    >>> storage.owns(m.weight), storage.nbytes
    (True, 128)

    A module holding DTensors is packed by ``sharded.pack_sharded_module`` instead (``shadow.pack``
    chooses).
    """
    unique: dict[int, torch.Tensor] = {}
    for _, tensor in named_tensors(module):
        unique.setdefault(id(tensor), tensor)
    storage, replacement = copy_into_flats(unique, device, dtype)

    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is not None and id(param) in replacement:
                param.data = replacement[id(param)]
        for name, buf in submodule._buffers.items():
            if buf is not None and id(buf) in replacement:
                submodule._buffers[name] = replacement[id(buf)]
    compact_parameters([p for p in unique.values() if isinstance(p, nn.Parameter)])
    return storage


def _compactable(param: nn.Parameter) -> bool:
    # what torch.utils.swap_tensors would move, poison or refuse: attributes, a gradient, hooks, an
    # autograd node or view holding its tensor, weak references
    return (type(param) is nn.Parameter and not param.__dict__ and param.is_leaf and param.grad is None
            and param._backward_hooks is None and param._use_count() == 1 and not weakref.getweakrefs(param))


def compact_parameters(params: list[nn.Parameter]) -> None:
    """Give each parameter (same object, same data) a C++ tensor made just now, in list order.

    Why: every update the address watch reads each shadow tensor's C++ metadata. A deep copy
    leaves those objects one per memory page, between the copies' data that packing freed; made
    back to back they share pages in the order the watch reads them (2,000 shadows of 1K fp32 after
    an update and an optimizer-step stand-in: the shadows' share of the watch 101 -> 75 us). Only
    the package's own shadows are compacted, never a model's tensors; a parameter with attributes,
    a gradient, hooks or weak references keeps its own.

    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> before = p
    >>> compact_parameters([p]); (p is before, p.tolist(), p.requires_grad)
    (True, [1.0, 1.0, 1.0], True)
    """
    params = [p for p in params if _compactable(p)]
    with torch.no_grad():  # made without autograd state first, so the tensors lie side by side
        fresh = [nn.Parameter(p.data, requires_grad=False) for p in params]
    for old, new in zip(params, fresh):
        new.requires_grad_(old.requires_grad)
    for old, new in zip(params, fresh):
        try:
            torch.utils.swap_tensors(old, new)
        except RuntimeError:  # refused before changing anything: it keeps its own
            pass
