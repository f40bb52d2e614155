"""One Triton launch updates a whole plan: program ``i`` takes row ``i`` of the block table
(tensor index, start element) and ``BLOCK`` elements of that tensor, so every branch below is
uniform per program. Same contract as the C++ kernels (``csrc/wavg_rule.h``): lerp-style update
in fp32 (fp64 for fp64 shadows), ``n_averaged`` read on the device and bumped by the last program
to finish, stochastic rounding of bf16 shadows with Philox keyed (seed; element // 4, update count),
bit for bit what ``wavg_fused.rounding`` computes.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Columns of the plan's tensor table (wavg_fused.plan.COLUMNS) and kernel codes.
_MODEL_PTR, _FLAT, _OFFSET, _NUMEL, _MODEL_DTYPE, _SHADOW_DTYPE, _ROLE, _FLAGS, _ITEMSIZE = (
    tl.constexpr(i) for i in range(9)
)


@triton.jit
def _pow(x, y):  # x ** y for x > 0 in float64 (x = 0 is handled by the callers' n == 0 case)
    return tl.exp(y * tl.log(x))


@triton.jit
def _step_weight(method, p0, p1, p2, p3, n):
    nf = n.to(tl.float64)
    if method == 0:  # EMA
        w = tl.where(n == 0, 1.0, 1.0 - p0)
    elif method == 1:  # SWA
        w = 1.0 / (nf + 1.0)
    elif method == 2:  # T-ADEMA: tanh(n) = 1 - 2 / (exp(2n) + 1), exact at n = 0 and saturating to 1
        w = 1.0 - p0 * (1.0 - 2.0 / (tl.exp(2.0 * nf) + 1.0))
    elif method == 3:  # EMA warm-up: p = (max decay, inv_gamma, power, min decay)
        decay = 1.0 - _pow(1.0 + nf / p1, -p2)
        w = tl.where(n == 0, 1.0, 1.0 - tl.minimum(tl.maximum(decay, p3), p0))
    else:  # power EMA, p0 = gamma
        w = tl.where(n == 0, 1.0, 1.0 - _pow(nf / (nf + 1.0), p0 + 1.0))
    return w


@triton.jit
def _stochastic_bf16(value, element, n, seed):
    group = element >> 2
    r0, r1, r2, r3 = tl.philox(
        seed,
        (group & 0xFFFFFFFF).to(tl.uint32),
        (group >> 32).to(tl.uint32),
        (n & 0xFFFFFFFF).to(tl.uint32),
        ((n >> 32) & 0xFFFFFFFF).to(tl.uint32),
    )
    lane = element & 3
    random = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    bits = value.to(tl.uint32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    bits = tl.where(finite, bits + (random & 0xFFFF), bits)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nearest_bf16(value):
    # Round to nearest even by hand: the Triton interpreter's float32 -> bfloat16 cast truncates.
    bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_shadow(value, S: tl.constexpr):
    if S == tl.bfloat16:
        out = _nearest_bf16(value)
    else:
        out = value.to(S)
    return out


@triton.jit
def _update_elements(shadow_ptr, model_ptr, offs, mask, w, copy, n, seed, first, S: tl.constexpr, M: tl.constexpr):
    if S == tl.float64:
        op: tl.constexpr = tl.float64
    else:
        op: tl.constexpr = tl.float32
    m = tl.load(model_ptr + offs, mask=mask)
    if copy:
        if S == M:  # the bits as they are (NaN payloads too): swap's backup must restore exactly
            tl.store(shadow_ptr + offs, m, mask=mask)
        else:
            tl.store(shadow_ptr + offs, _to_shadow(m.to(op), S), mask=mask)
    else:
        x = m.to(op)
        s = tl.load(shadow_ptr + offs, mask=mask).to(op)
        value = tl.where(w < 0.5, s + w.to(op) * (x - s), x - (x - s) * (1.0 - w.to(op)))
        if S == tl.bfloat16:
            if seed >= 0:
                tl.store(shadow_ptr + offs, _stochastic_bf16(value, first + offs, n, seed), mask=mask)
            else:
                tl.store(shadow_ptr + offs, _nearest_bf16(value), mask=mask)
        else:
            tl.store(shadow_ptr + offs, value.to(S), mask=mask)


@triton.jit
def _update_block(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first,
                  S: tl.constexpr, M: tl.constexpr, ALIGNED):
    shadow_ptr = shadow_addr.to(tl.pointer_type(S))
    model_ptr = model_addr.to(tl.pointer_type(M))
    # Four specialisations, so the compiler can use 16-byte accesses where they are safe: the host
    # verified both bases are 16-byte aligned, and a full block needs no mask (a mask that may end
    # anywhere forbids vector accesses).
    if ALIGNED:
        if full:
            _update_elements(tl.multiple_of(shadow_ptr, 16), tl.multiple_of(model_ptr, 16), offs, None,
                             w, copy, n, seed, first, S, M)
        else:
            _update_elements(tl.multiple_of(shadow_ptr, 16), tl.multiple_of(model_ptr, 16), offs, offs < numel,
                             w, copy, n, seed, first, S, M)
    else:
        if full:
            _update_elements(shadow_ptr, model_ptr, offs, None, w, copy, n, seed, first, S, M)
        else:
            _update_elements(shadow_ptr, model_ptr, offs, offs < numel, w, copy, n, seed, first, S, M)


@triton.jit
def _move(dst_addr, src_addr, offs, mask, W: tl.constexpr, SWAP: tl.constexpr):
    dst = dst_addr.to(tl.pointer_type(W))
    src = src_addr.to(tl.pointer_type(W))
    value = tl.load(src + offs, mask=mask)
    if SWAP:
        tl.store(src + offs, tl.load(dst + offs, mask=mask), mask=mask)
    tl.store(dst + offs, value, mask=mask)


@triton.jit
def _move_words(dst_addr, src_addr, offs, mask, itemsize, SWAP: tl.constexpr):
    # Copy (or exchange) elements as machine words of their size: any dtype, no conversion.
    if itemsize == 8:
        _move(dst_addr, src_addr, offs, mask, tl.int64, SWAP)
    elif itemsize == 4:
        _move(dst_addr, src_addr, offs, mask, tl.int32, SWAP)
    elif itemsize == 2:
        _move(dst_addr, src_addr, offs, mask, tl.int16, SWAP)
    elif itemsize == 1:
        _move(dst_addr, src_addr, offs, mask, tl.int8, SWAP)
    else:  # 16-byte elements (complex128): two words each
        _move(dst_addr, src_addr, offs * 2, mask, tl.int64, SWAP)
        _move(dst_addr, src_addr, offs * 2 + 1, mask, tl.int64, SWAP)


@triton.jit
def _cast_to_model(shadow_addr, model_addr, offs, mask, S: tl.constexpr, M: tl.constexpr):
    if S == tl.float64:
        op: tl.constexpr = tl.float64
    else:
        op: tl.constexpr = tl.float32
    value = tl.load(shadow_addr.to(tl.pointer_type(S)) + offs, mask=mask).to(op)
    tl.store(model_addr.to(tl.pointer_type(M)) + offs, _to_shadow(value, M), mask=mask)


@triton.jit
def _cast_from(shadow_addr, model_addr, offs, mask, scode, M: tl.constexpr):
    if scode == 0:
        _cast_to_model(shadow_addr, model_addr, offs, mask, tl.float32, M)
    elif scode == 1:
        _cast_to_model(shadow_addr, model_addr, offs, mask, tl.float64, M)
    elif scode == 2:
        _cast_to_model(shadow_addr, model_addr, offs, mask, tl.float16, M)
    else:
        _cast_to_model(shadow_addr, model_addr, offs, mask, tl.bfloat16, M)


@triton.jit
def _transfer(shadow_addr, model_addr, offs, mask, mode, mcode, scode, itemsize):
    # mode 1: model <- shadow (cast when the dtypes differ); mode 2: exchange (equal dtypes)
    if (mode == 1) & (mcode != scode):
        if mcode == 0:
            _cast_from(shadow_addr, model_addr, offs, mask, scode, tl.float32)
        elif mcode == 1:
            _cast_from(shadow_addr, model_addr, offs, mask, scode, tl.float64)
        elif mcode == 2:
            _cast_from(shadow_addr, model_addr, offs, mask, scode, tl.float16)
        else:
            _cast_from(shadow_addr, model_addr, offs, mask, scode, tl.bfloat16)
    elif mode == 1:
        _move_words(model_addr, shadow_addr, offs, mask, itemsize, False)
    else:
        _move_words(shadow_addr, model_addr, offs, mask, itemsize, True)


@triton.jit
def _floating(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, mcode,
              S: tl.constexpr, ALIGNED):
    if mcode == 0:
        _update_block(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, S, tl.float32, ALIGNED)
    elif mcode == 1:
        _update_block(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, S, tl.float64, ALIGNED)
    elif mcode == 2:
        _update_block(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, S, tl.float16, ALIGNED)
    else:
        _update_block(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, S, tl.bfloat16, ALIGNED)


@triton.jit
def _exponent_all_ones(bits_ptr, offs, mask, exponent):
    # 1 if an element's exponent bits are all set (Inf or NaN: csrc/wavg_rule.h nonfinite_bits)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0)
    return tl.max(((bits & exponent) == exponent).to(tl.int32), axis=0)


@triton.jit
def _nonfinite(model_addr, offs, mask, mcode):
    if mcode == 0:
        found = _exponent_all_ones(model_addr.to(tl.pointer_type(tl.int32)), offs, mask, 0x7F800000)
    elif mcode == 1:
        found = _exponent_all_ones(model_addr.to(tl.pointer_type(tl.int64)), offs, mask, 0x7FF0000000000000)
    elif mcode == 2:
        found = _exponent_all_ones(model_addr.to(tl.pointer_type(tl.int16)), offs, mask, 0x7C00)
    else:
        found = _exponent_all_ones(model_addr.to(tl.pointer_type(tl.int16)), offs, mask, 0x7F80)
    return found


@triton.jit
def _wavg_update_kernel(table_ptr, blocks_ptr, flat_bases_ptr, params_ptr, n_ptr, done_ptr, skipped_ptr, num_blocks,
                        method, seed, bump, mode, guard, has_skipped, BLOCK: tl.constexpr, NCOL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any offset arithmetic
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(blocks_ptr + 2 * pid + 1), BLOCK)  # blocks start at multiples of BLOCK
    p0 = tl.load(params_ptr)  # float64: a Python float argument would be rounded to float32
    p1 = tl.load(params_ptr + 1)
    p2 = tl.load(params_ptr + 2)
    p3 = tl.load(params_ptr + 3)
    row = table_ptr + t * NCOL
    model_addr = tl.load(row + _MODEL_PTR)
    first = tl.load(row + _OFFSET)
    numel = tl.load(row + _NUMEL)
    mcode = tl.load(row + _MODEL_DTYPE)
    scode = tl.load(row + _SHADOW_DTYPE)
    copy = tl.load(row + _ROLE) == 0
    aligned = (tl.load(row + _FLAGS) & 1) != 0
    itemsize = tl.load(row + _ITEMSIZE)
    shadow_addr = tl.load(flat_bases_ptr + tl.load(row + _FLAT)) + first * itemsize
    n = tl.load(n_ptr)  # every program reads it before the last one bumps it
    w = _step_weight(method, p0, p1, p2, p3, n)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    full = start + BLOCK <= numel
    flag_ptr = done_ptr + 1  # workspace[1]: the non-finite flag (workspace[0] counts finished programs)
    # set by a mode-3 launch before this one, the same for every program
    skip = (tl.load(flag_ptr) != 0) & (guard != 0)

    if mode == 3:  # check only: flag an Inf or NaN among the averaged model values
        if (not copy) & (mcode <= 3):
            if _nonfinite(model_addr, offs, mask, mcode) != 0:
                tl.store(flag_ptr, 1)
    elif mode != 0:  # transfers write the model and never bump (the host passes bump = False)
        _transfer(shadow_addr, model_addr, offs, mask, mode, mcode, scode, itemsize)
    elif skip:
        pass  # the whole update is skipped: no shadow is written
    elif (mcode <= 3) & (scode <= 3):
        if scode == 0:
            _floating(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, mcode, tl.float32, aligned)
        elif scode == 1:
            _floating(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, mcode, tl.float64, aligned)
        elif scode == 2:
            _floating(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, mcode, tl.float16, aligned)
        else:
            _floating(shadow_addr, model_addr, offs, numel, full, w, copy, n, seed, first, mcode, tl.bfloat16, aligned)
    else:  # integers, bools and other types: copied as words
        _move_words(shadow_addr, model_addr, offs, mask, itemsize, False)

    if bump | guard:
        finished = tl.atomic_add(done_ptr, 1)  # acq_rel: this program's reads of n and the flag came first
        if finished == num_blocks - 1:
            if skip:
                if has_skipped:
                    tl.store(skipped_ptr, tl.load(skipped_ptr) + 1)
                tl.store(flag_ptr, 0)
            elif bump:
                tl.store(n_ptr, n + 1)
            tl.store(done_ptr, 0)  # ready for the next launch and for graph replays


def launch(table, blocks, flat_bases, params, n_averaged, workspace, method: int, seed: int, bump: bool,
           block: int, num_warps: int, mode: int = 0, guard: bool = False, n_skipped=None) -> None:
    """Run ``_wavg_update_kernel`` once over the plan (``blocks`` built for ``block`` elements).

    ``mode`` 3 sets ``workspace[1]`` if an averaged model value is Inf or NaN; ``guard`` makes
    the update (mode 0) skip everything when that flag is set, bumping ``n_skipped`` instead.
    """
    num_blocks = blocks.shape[0]
    guard = guard and mode == 0
    if num_blocks == 0:
        if mode == 0 and guard:  # the flag can be set here only by a caller combining devices' flags
            flag = workspace[1].long()
            if bump:
                n_averaged.sub_(flag).add_(1)
            if n_skipped is not None:
                n_skipped.add_(flag)
            workspace[1].zero_()
        elif mode == 0 and bump:
            n_averaged.add_(1)
        return
    args, kwargs = launch_args(table, blocks, flat_bases, params, n_averaged, workspace, method, seed, bump,
                               block, num_warps, mode, guard, n_skipped)
    _wavg_update_kernel[(num_blocks,)](*args, **kwargs)


def launch_args(table, blocks, flat_bases, params, n_averaged, workspace, method, seed, bump, block, num_warps,
                mode=0, guard=False, n_skipped=None):
    """The arguments ``launch`` passes to ``_wavg_update_kernel`` (what a GPU compiles for)."""
    args = (table, blocks, flat_bases, params, n_averaged, workspace, n_averaged if n_skipped is None else n_skipped,
            blocks.shape[0], method, seed, bump, mode, guard, n_skipped is not None)
    return args, dict(BLOCK=block, NCOL=table.shape[1], num_warps=num_warps)


def variants():
    """(name, kernel, args, kwargs) of representative launches, for compiling without a GPU."""
    import torch

    table = torch.zeros(3, 9, dtype=torch.int64)
    params = torch.zeros(4, dtype=torch.float64)
    n = torch.zeros((), dtype=torch.int64)
    workspace = torch.zeros(2, dtype=torch.int32)
    out = []
    for name, block, warps, mode, bump in (("update-4096", 4096, 8, 0, True), ("update-1024", 1024, 4, 0, True),
                                           ("check-4096", 4096, 8, 3, False)):
        blocks = torch.zeros(1001, 2, dtype=torch.int64)
        args, kwargs = launch_args(table, blocks, table, params, n, workspace, 0, -1, bump, block, warps, mode)
        out.append((name, _wavg_update_kernel, args, kwargs))
    return out
