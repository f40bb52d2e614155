"""The plan: what one update does, built once per model structure and consumed by every backend.

Per tensor (``tensor_table``, int64, one row each): model address, which storage buffer (an index
into ``flats``) and the element offset in it, element count, model and shadow dtype codes, role
(average or copy), flags and element size. Shadows are addressed through the buffers passed to
the op rather than by absolute address, so the op stays correct when torch.compile hands it
copies of those buffers. Per block (``block_table(block_elems)``): tensor index and start element, so a kernel
maps one program to one fixed-size piece of one tensor. Tables are built on the host once and
kept on the plan's device; they change only when the plan is rebuilt.

Model tensors a kernel cannot read in place (on another device, or laid out differently from
their shadow) are *staged*: copied into a persistent buffer with the shadow's layout before the
launch (``stage()``), and the table points at the staging buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .storage import ALIGN_BYTES, dense_strides

__all__ = [
    "ROLE_COPY",
    "ROLE_AVERAGE",
    "DTYPE_CODES",
    "COLUMNS",
    "FLAG_ALIGNED",
    "Plan",
    "check_structure",
    "check_kernel_dtypes",
    "block_table",
]

ROLE_COPY = 0
ROLE_AVERAGE = 1
# What a launch does (csrc/wavg_rule.h Mode): the update, or a transfer that writes the model
MODE_AVERAGE = 0
MODE_COPY_TO_MODEL = 1
MODE_SWAP = 2
MODE_CHECK = 3  # read only: flag an Inf or NaN among the averaged model values (workspace[NONFINITE_SLOT])
NONFINITE_SLOT = 1  # csrc/wavg_rule.h kNonfiniteSlot; slot 0 counts finished CUDA blocks

# Kernel-facing dtype codes; the C++ header and the Triton kernel use the same numbers.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int64: 4,
    torch.int32: 5,
    torch.int16: 6,
    torch.int8: 7,
    torch.uint8: 8,
    torch.bool: 9,
}
OTHER_DTYPE = 15  # copied byte-wise (``itemsize`` bytes each): model and shadow dtypes are then equal

COLUMNS = (
    "model_ptr",
    "flat",
    "shadow_offset",
    "numel",
    "model_dtype",
    "shadow_dtype",
    "role",
    "flags",
    "itemsize",
)
FLAG_ALIGNED = 1  # model and shadow addresses are both ALIGN_BYTES-aligned: vector loads are safe


def check_structure(
    shadow_names: Sequence[str],
    shadows: Sequence[torch.Tensor],
    model_names: Sequence[str],
    models: Sequence[torch.Tensor],
) -> None:
    """Raise ``ValueError`` naming the first tensor where the model differs from the shadow."""
    for index, (shadow_name, model_name) in enumerate(zip(shadow_names, model_names)):
        if shadow_name != model_name:
            raise ValueError(
                f"model structure differs from the averaged copy at tensor #{index}: "
                f"expected {shadow_name!r}, got {model_name!r}"
            )
    if len(shadow_names) != len(model_names):
        longer, side = (
            (shadow_names, "is missing") if len(shadow_names) > len(model_names) else (model_names, "has an extra")
        )
        first = longer[min(len(shadow_names), len(model_names))]
        raise ValueError(
            f"model structure differs from the averaged copy: the model {side} tensor {first!r} "
            f"({len(model_names)} tensors, the averaged copy has {len(shadow_names)})"
        )
    for name, shadow, model in zip(shadow_names, shadows, models):
        if shadow.shape != model.shape:
            raise ValueError(
                f"tensor {name!r}: model shape {tuple(model.shape)} differs from the averaged "
                f"copy's {tuple(shadow.shape)}"
            )
        if shadow.is_floating_point() != model.is_floating_point() or (
            not shadow.is_floating_point() and shadow.dtype != model.dtype
        ):
            raise ValueError(f"tensor {name!r}: model dtype {model.dtype} cannot update a {shadow.dtype} average")


def check_kernel_dtypes(
    names: Sequence[str], shadows: Sequence[torch.Tensor], models: Sequence[torch.Tensor], roles: Sequence[int]
) -> None:
    """Raise ``ValueError`` naming the first tensor the kernels cannot handle: a floating dtype
    without a kernel code (float8 ...) that is to be averaged, or cast to another dtype. Such
    tensors are copied byte for byte only where shadow and model dtypes are equal.

    >>> x8 = torch.zeros(2, dtype=torch.float8_e4m3fn)
    >>> check_kernel_dtypes(["w"], [x8], [x8], [ROLE_COPY])  # an equal-dtype copy is fine
    >>> check_kernel_dtypes(["w"], [x8], [x8], [ROLE_AVERAGE])
    Traceback (most recent call last):
    ...
    ValueError: tensor 'w': dtype torch.float8_e4m3fn cannot be averaged by wavg_fused (its kernels average float16, bfloat16, float32 and float64); exclude it (exclude=['w']) or keep it in a supported dtype
    """
    for name, shadow, model, role in zip(names, shadows, models, roles):
        unsupported = next((t.dtype for t in (model, shadow) if t.is_floating_point() and t.dtype not in DTYPE_CODES), None)
        if unsupported is None:
            continue
        if role == ROLE_AVERAGE:
            raise ValueError(
                f"tensor {name!r}: dtype {unsupported} cannot be averaged by wavg_fused (its kernels average "
                f"float16, bfloat16, float32 and float64); exclude it (exclude=[{name!r}]) or keep it in a "
                "supported dtype"
            )
        if model.dtype != shadow.dtype:
            raise ValueError(
                f"tensor {name!r}: cannot copy a {model.dtype} model tensor into a {shadow.dtype} average "
                "(no kernel converts that dtype); leave dtype= unset for it or keep the model in a supported dtype"
            )


def block_table(numels: Sequence[int], block_elems: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[num_blocks, 2]`` int64: (tensor index, start element) of each ``block_elems`` piece.

    Zero-element tensors get no block; the arithmetic is int64 throughout, so tensors above
    2**31 elements are fine.

    >>> block_table([5, 0, 3], 4).tolist()
    [[0, 0], [0, 4], [2, 0]]
    """
    if block_elems <= 0:
        raise ValueError(f"block_elems must be positive, got {block_elems}")
    sizes = torch.tensor(list(numels), dtype=torch.int64)
    counts = (sizes + block_elems - 1) // block_elems
    index = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), counts)
    first_block = torch.cumsum(counts, 0) - counts
    start = (torch.arange(index.numel(), dtype=torch.int64) - first_block[index]) * block_elems
    return torch.stack([index, start], dim=1).to(device)


def _needs_staging(model: torch.Tensor, shadow: torch.Tensor) -> bool:
    if model.device != shadow.device:
        return True
    if model.numel() <= 1:
        return False
    return model.stride() != shadow.stride() or dense_strides(model) != tuple(model.stride())


def cached_tensors(cache: dict) -> list[torch.Tensor]:
    """The tensors in a ``backend_cache`` (values, and tuples, lists and dicts of them)."""
    found, pending = [], list(cache.values())
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
    return found


class Plan:
    """Everything one device's update needs; rebuilt when a model address, shape or dtype changes.

    ``names``, ``shadows``, ``models`` and ``roles`` are parallel lists (one entry per unique
    shadow tensor on ``device``); ``flats`` are the storage buffers holding the shadows. Backends
    may keep derived data in ``backend_cache``.
    """

    def __init__(
        self,
        names: Sequence[str],
        shadows: Sequence[torch.Tensor],
        models: Sequence[torch.Tensor],
        roles: Sequence[int],
        shadow_offsets: Sequence[int],
        flats: Sequence[torch.Tensor] = (),
    ) -> None:
        self.names = list(names)
        self.shadows = list(shadows)
        self.models = list(models)
        self.roles = list(roles)
        self.shadow_offsets = list(shadow_offsets)
        self.flats = list(flats)  # the storage buffers the shadows live in (what kernels write)
        self.device = self.shadows[0].device if self.shadows else torch.device("cpu")
        # kernels' scratch, zero between updates: finished-block count, non-finite flag
        self.workspace = torch.zeros(2, dtype=torch.int32, device=self.device)
        # the op's n_averaged argument for transfers (copy_to, swap), which neither read nor bump it
        self.spare_count = torch.zeros((), dtype=torch.long, device=self.device)
        self.numels = [s.numel() for s in self.shadows]
        self.backend_cache: dict[str, object] = {}
        check_kernel_dtypes(self.names, self.shadows, self.models, self.roles)
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (staging buffer, model tensor)
        self.readable_models = []  # what kernels read: the model tensor itself or its staging buffer
        for shadow, model in zip(self.shadows, self.models):
            if _needs_staging(model, shadow):
                staging = torch.empty_strided(shadow.shape, shadow.stride(), dtype=model.dtype, device=shadow.device)
                self._staged.append((staging, model))
                self.readable_models.append(staging)
            else:
                self.readable_models.append(model)
        # Staged copies from another GPU are stream-ordered (non-blocking is safe); from host memory,
        # pinned memory makes a non-blocking copy truly asynchronous, and the optimizer could
        # overwrite the weights before the copy reads them: those copies block.
        ordered = [m.device.type != "cpu" and s.device.type != "cpu" for s, m in self._staged]
        self._staged_from_device = [pair for pair, o in zip(self._staged, ordered) if o]
        self._staged_blocking = [pair for pair, o in zip(self._staged, ordered) if not o]
        self._tables: dict[tuple[str, int], torch.Tensor] = {}
        self._layouts: list[tuple[int, torch.Size, tuple[int, ...], torch.dtype]] | None = None
        # CUDA streams whose use of this plan's memory the allocator knows (mark_stream), and how
        # much memory there was then: tables and backend caches are made lazily, at first use
        self._streams_seen: set[int] = set()
        self._memory_version = (0, 0)

    def model_layouts(self) -> list[tuple[int, torch.Size, tuple[int, ...], torch.dtype]]:
        """(storage offset, shape, strides, dtype) of each model tensor when first asked, kept
        with the plan: enough to view the memory the plan addresses again after the model let
        go of it (``wavg_fused.swap``). Ask only while the plan is current."""
        if self._layouts is None:
            self._layouts = [(m.storage_offset(), m.shape, m.stride(), m.dtype) for m in self.models]
        return self._layouts

    @property
    def staged_count(self) -> int:
        return len(self._staged)

    def stage(self) -> None:
        """Copy the model tensors kernels cannot read in place into their staging buffers."""
        # Into host memory the CPU kernel reads next, so that copy must have landed: blocking too
        # (a CPU average of a GPU model waits for the GPU by nature).
        for pairs, non_blocking in ((self._staged_from_device, True), (self._staged_blocking, False)):
            if pairs:
                torch._foreach_copy_([s for s, _ in pairs], [m for _, m in pairs], non_blocking=non_blocking)

    def device_memory(self) -> list[torch.Tensor]:
        """Every tensor of this plan that a launch reads or writes besides the model's: storage
        buffers, tables, workspace, counters, staging buffers and what backends cached."""
        found = [*self.flats, self.workspace, self.spare_count, *self._tables.values()]
        found += [staging for staging, _ in self._staged]
        return found + cached_tensors(self.backend_cache)

    def mark_stream(self) -> None:
        """Call after each launch: tell the caching allocator that the current CUDA stream uses
        this plan's memory (once per stream and per set of tensors: record_stream is consulted
        when memory is freed, so once covers every later launch), so memory of a plan dropped
        while a side stream's launch is still queued is not handed out again under it.
        A captured CUDA graph is not a stream: docs/compile-and-graphs.md (CUDA graphs) gives its rule."""
        if self.device.type != "cuda" or torch.compiler.is_compiling():
            return
        version = (len(self._tables), len(self.backend_cache))
        if version != self._memory_version:
            self._memory_version = version
            self._streams_seen.clear()
        stream = torch.cuda.current_stream(self.device)
        if stream.stream_id in self._streams_seen or torch.cuda.is_current_stream_capturing():
            return  # (inside a capture the graph rule applies)
        self._streams_seen.add(stream.stream_id)
        for tensor in self.device_memory():
            if tensor.device.type == "cuda":
                tensor.record_stream(stream)

    def unstage(self) -> None:
        """After a transfer wrote the staging buffers, copy them back into their model tensors."""
        if self._staged:
            torch._foreach_copy_([m for _, m in self._staged], [s for s, _ in self._staged])

    def host_tensor_table(self) -> torch.Tensor:
        """``[num_tensors, len(COLUMNS)]`` int64 on the CPU."""
        flat_index = {flat.dtype: index for index, flat in enumerate(self.flats)}
        rows = []
        for shadow, model, offset, role in zip(self.shadows, self.readable_models, self.shadow_offsets, self.roles):
            aligned = model.data_ptr() % ALIGN_BYTES == 0 and shadow.data_ptr() % ALIGN_BYTES == 0
            rows.append(
                (
                    model.data_ptr(),
                    flat_index.get(shadow.dtype, -1),
                    offset,
                    shadow.numel(),
                    DTYPE_CODES.get(model.dtype, OTHER_DTYPE),
                    DTYPE_CODES.get(shadow.dtype, OTHER_DTYPE),
                    role,
                    FLAG_ALIGNED if aligned else 0,
                    shadow.element_size(),
                )
            )
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(COLUMNS))

    def tensor_table(self) -> torch.Tensor:
        """The tensor table on the plan's device, uploaded once per plan."""
        key = ("tensors", 0)
        if key not in self._tables:
            self._tables[key] = self.host_tensor_table().to(self.device)
        return self._tables[key]

    def block_table(self, block_elems: int) -> torch.Tensor:
        """The block table for ``block_elems``-element blocks on the plan's device, built once."""
        key = ("blocks", block_elems)
        if key not in self._tables:
            self._tables[key] = block_table(self.numels, block_elems, self.device)
        return self._tables[key]
