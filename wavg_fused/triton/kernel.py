"""One Triton launch updates a whole plan: program ``i`` takes row ``i`` of the block table
(tensor index, start element) and ``BLOCK`` elements of that tensor, so every branch below is
uniform per program. Same contract as the C++ kernels (``csrc/wavg_rule.h``): lerp-style update
in fp32 (fp64 for fp64 shadows), ``n_averaged`` read on the device and bumped by the last program
to finish, stochastic rounding of bf16 shadows with Philox keyed (seed; element // 4, update count),
bit for bit what ``wavg_fused.rounding`` computes.

Compiled variants: what a launch does (``MODE``: update, transfer, check) and whether it rounds
at random (``STOCHASTIC``) are constexprs, so each variant holds only its own pass; everything
that changes from call to call (block count, method, its float64 parameters, seed, flags) is an
int32 argument Triton does not specialise (``do_not_specialize``), and pointers are not
specialised on alignment (the kernel states alignment itself, from the plan's flag). So the
variants are ``MODE x STOCHASTIC x (BLOCK, num_warps)``, and no value a plan or a step changes
compiles a new one. ``variants()`` lists them; ``launch_args`` is the one place that turns a
launch into kernel arguments, used by ``launch`` and by the compile test.

The group kernel (``_wavg_group_kernel``, ``launch_group``) updates several averages of one model
(``AveragerGroup``) in one launch: each program runs its block for every member in turn, with the
single kernel's own per-block code (``_decode``, ``_average``), so each member's shadow is bit for
bit what its single update writes. Its members' scalars are a small int64 table on the device;
its variants are ``STOCHASTIC`` 0 and 2 (some member rounds at random: each member rounds as
its seed says, a branch at run time) at one ``(BLOCK, num_warps)``.
"""

from __future__ import annotations

import struct
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Columns of the plan's tensor table (wavg_fused.plan.COLUMNS) and kernel codes.
_MODEL_PTR, _FLAT, _OFFSET, _NUMEL, _MODEL_DTYPE, _SHADOW_DTYPE, _ROLE, _FLAGS, _ITEMSIZE = (
    tl.constexpr(i) for i in range(9)
)
# STOCHASTIC: 0 rounds bf16 shadows to nearest, 1 at random (the single kernel: seed >= 0), 2 as
# each update's seed says, at run time (the group kernel, whose members may differ)
_PER_SEED = tl.constexpr(2)


@triton.jit
def _pow(x, y):  # x ** y for x > 0 in float64 (x = 0 is handled by the callers' n == 0 case)
    return tl.exp(y * tl.log(x))


@triton.jit
def _float64(lo, hi):
    # a float64 passed as two int32 halves (a Python float argument would be rounded to float32)
    bits = (hi.to(tl.int64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _int64(lo, hi):
    return (hi.to(tl.int64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)


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
def _stochastic_bf16(value, element0, n, seed, BLOCK: tl.constexpr):
    # Elements element0 .. element0 + BLOCK - 1, element0 a multiple of 4 (the host checks shadow
    # offsets, program starts are multiples of BLOCK): one Philox call per group of four elements,
    # its four words interleaved so that element 4g + j takes word j of group g.
    group = (element0 >> 2) + tl.arange(0, BLOCK // 4).to(tl.int64)
    r0, r1, r2, r3 = tl.philox(
        seed,
        (group & 0xFFFFFFFF).to(tl.uint32),
        (group >> 32).to(tl.uint32),
        (n & 0xFFFFFFFF).to(tl.uint32),
        ((n >> 32) & 0xFFFFFFFF).to(tl.uint32),
    )
    # join(join(r0, r2), join(r1, r3))[g, j, k] is word 2j + k of group g: row-major, r0 r1 r2 r3
    random = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
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
def _pointer(addr, start, ALIGNED: tl.constexpr, T: tl.constexpr):
    # Element ``start`` of the tensor at ``addr``. ALIGNED (the plan's flag: both tensors start
    # 16-byte aligned; program starts are multiples of BLOCK >= 16 elements) lets the compiler use
    # 16-byte accesses. The hint must be given on the path that uses the pointer: a pointer
    # hinted inside a runtime branch and used after it loses the hint at the merge.
    ptr = addr.to(tl.pointer_type(T)) + start
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _update_elements(shadow, model, local, mask, w, copy, n, seed, element0,
                     S: tl.constexpr, M: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    if S == tl.float64:
        op: tl.constexpr = tl.float64
    else:
        op: tl.constexpr = tl.float32
    m = tl.load(model + local, mask=mask)
    if copy:
        if S == M:  # the bits as they are (NaN payloads too): swap's backup must restore exactly
            tl.store(shadow + local, m, mask=mask)
        else:
            tl.store(shadow + local, _to_shadow(m.to(op), S), mask=mask)
    else:
        x = m.to(op)
        s = tl.load(shadow + local, mask=mask).to(op)
        value = tl.where(w < 0.5, s + w.to(op) * (x - s), x - (x - s) * (1.0 - w.to(op)))
        if S == tl.bfloat16:
            if STOCHASTIC:
                tl.store(shadow + local, _stochastic_bf16(value, element0, n, seed, BLOCK), mask=mask)
            else:
                tl.store(shadow + local, _nearest_bf16(value), mask=mask)
        else:
            tl.store(shadow + local, value.to(S), mask=mask)


@triton.jit
def _update_path(shadow_addr, model_addr, start, remaining, w, copy, n, seed, element0,
                 S: tl.constexpr, M: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
                 ALIGNED: tl.constexpr):
    # Offsets built here, in this dtype pair's own layout (a block-wide offset tensor shared by
    # every branch costs layout conversions through shared memory). A full block needs no mask: a
    # mask that may end anywhere forbids vector accesses.
    shadow = _pointer(shadow_addr, start, ALIGNED, S)
    model = _pointer(model_addr, start, ALIGNED, M)
    local = tl.arange(0, BLOCK)
    if remaining >= BLOCK:
        _update_elements(shadow, model, local, None, w, copy, n, seed, element0, S, M, STOCHASTIC, BLOCK)
    else:
        _update_elements(shadow, model, local, local < remaining, w, copy, n, seed, element0, S, M, STOCHASTIC,
                         BLOCK)


@triton.jit
def _update_block(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0,
                  S: tl.constexpr, M: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    if aligned:
        _update_path(shadow_addr, model_addr, start, remaining, w, copy, n, seed, element0, S, M, STOCHASTIC, BLOCK,
                     True)
    else:
        _update_path(shadow_addr, model_addr, start, remaining, w, copy, n, seed, element0, S, M, STOCHASTIC, BLOCK,
                     False)


@triton.jit
def _floating(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, mcode,
              S: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    if mcode == 0:
        _update_block(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, S, tl.float32,
                      STOCHASTIC, BLOCK)
    elif mcode == 1:
        _update_block(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, S, tl.float64,
                      STOCHASTIC, BLOCK)
    elif mcode == 2:
        _update_block(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, S, tl.float16,
                      STOCHASTIC, BLOCK)
    else:
        _update_block(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, S, tl.bfloat16,
                      STOCHASTIC, BLOCK)


@triton.jit
def _move_elements(dst, src, local, mask, SWAP: tl.constexpr):
    value = tl.load(src + local, mask=mask)
    if SWAP:
        tl.store(src + local, tl.load(dst + local, mask=mask), mask=mask)
    tl.store(dst + local, value, mask=mask)


@triton.jit
def _move_path(dst_addr, src_addr, start, remaining, W: tl.constexpr, SWAP: tl.constexpr, COUNT: tl.constexpr,
               ALIGNED: tl.constexpr):
    dst = _pointer(dst_addr, start, ALIGNED, W)
    src = _pointer(src_addr, start, ALIGNED, W)
    local = tl.arange(0, COUNT)
    if remaining >= COUNT:
        _move_elements(dst, src, local, None, SWAP)
    else:
        _move_elements(dst, src, local, local < remaining, SWAP)


@triton.jit
def _move(dst_addr, src_addr, start, remaining, aligned, W: tl.constexpr, SWAP: tl.constexpr,
          COUNT: tl.constexpr):
    # COUNT words of type W from word ``start`` on, ``remaining`` of them valid
    if aligned:
        _move_path(dst_addr, src_addr, start, remaining, W, SWAP, COUNT, True)
    else:
        _move_path(dst_addr, src_addr, start, remaining, W, SWAP, COUNT, False)


@triton.jit
def _move_words(dst_addr, src_addr, start, remaining, aligned, itemsize, SWAP: tl.constexpr, BLOCK: tl.constexpr):
    # Copy (or exchange) elements as machine words of their size: any dtype, no conversion.
    if itemsize == 8:
        _move(dst_addr, src_addr, start, remaining, aligned, tl.int64, SWAP, BLOCK)
    elif itemsize == 4:
        _move(dst_addr, src_addr, start, remaining, aligned, tl.int32, SWAP, BLOCK)
    elif itemsize == 2:
        _move(dst_addr, src_addr, start, remaining, aligned, tl.int16, SWAP, BLOCK)
    elif itemsize == 1:
        _move(dst_addr, src_addr, start, remaining, aligned, tl.int8, SWAP, BLOCK)
    else:  # 16-byte elements (complex128): two words each, BLOCK words at a time (registers)
        _move(dst_addr, src_addr, 2 * start, 2 * remaining, aligned, tl.int64, SWAP, BLOCK)
        _move(dst_addr, src_addr, 2 * start + BLOCK, 2 * remaining - BLOCK, aligned, tl.int64, SWAP, BLOCK)


@triton.jit
def _cast_elements(shadow, model, local, mask, S: tl.constexpr, M: tl.constexpr):
    if S == tl.float64:
        op: tl.constexpr = tl.float64
    else:
        op: tl.constexpr = tl.float32
    value = tl.load(shadow + local, mask=mask).to(op)
    tl.store(model + local, _to_shadow(value, M), mask=mask)


@triton.jit
def _cast_path(shadow_addr, model_addr, start, remaining, S: tl.constexpr, M: tl.constexpr, BLOCK: tl.constexpr,
               ALIGNED: tl.constexpr):
    shadow = _pointer(shadow_addr, start, ALIGNED, S)
    model = _pointer(model_addr, start, ALIGNED, M)
    local = tl.arange(0, BLOCK)
    if remaining >= BLOCK:
        _cast_elements(shadow, model, local, None, S, M)
    else:
        _cast_elements(shadow, model, local, local < remaining, S, M)


@triton.jit
def _cast_to_model(shadow_addr, model_addr, start, remaining, aligned, S: tl.constexpr, M: tl.constexpr,
                   BLOCK: tl.constexpr):
    if aligned:
        _cast_path(shadow_addr, model_addr, start, remaining, S, M, BLOCK, True)
    else:
        _cast_path(shadow_addr, model_addr, start, remaining, S, M, BLOCK, False)


@triton.jit
def _cast_from(shadow_addr, model_addr, start, remaining, aligned, scode, M: tl.constexpr, BLOCK: tl.constexpr):
    if scode == 0:
        _cast_to_model(shadow_addr, model_addr, start, remaining, aligned, tl.float32, M, BLOCK)
    elif scode == 1:
        _cast_to_model(shadow_addr, model_addr, start, remaining, aligned, tl.float64, M, BLOCK)
    elif scode == 2:
        _cast_to_model(shadow_addr, model_addr, start, remaining, aligned, tl.float16, M, BLOCK)
    else:
        _cast_to_model(shadow_addr, model_addr, start, remaining, aligned, tl.bfloat16, M, BLOCK)


@triton.jit
def _transfer(shadow_addr, model_addr, start, remaining, aligned, swap, mcode, scode, itemsize,
              BLOCK: tl.constexpr):
    # model <- shadow (cast when the dtypes differ), or exchange them (``swap``: equal dtypes)
    if (swap == 0) & (mcode != scode):
        if mcode == 0:
            _cast_from(shadow_addr, model_addr, start, remaining, aligned, scode, tl.float32, BLOCK)
        elif mcode == 1:
            _cast_from(shadow_addr, model_addr, start, remaining, aligned, scode, tl.float64, BLOCK)
        elif mcode == 2:
            _cast_from(shadow_addr, model_addr, start, remaining, aligned, scode, tl.float16, BLOCK)
        else:
            _cast_from(shadow_addr, model_addr, start, remaining, aligned, scode, tl.bfloat16, BLOCK)
    elif swap == 0:
        _move_words(model_addr, shadow_addr, start, remaining, aligned, itemsize, False, BLOCK)
    else:
        _move_words(shadow_addr, model_addr, start, remaining, aligned, itemsize, True, BLOCK)


@triton.jit
def _exponent_all_ones(bits, local, mask, other, exponent):
    # 1 if an element's exponent bits are all set (Inf or NaN: csrc/wavg_rule.h nonfinite_bits)
    value = tl.load(bits + local, mask=mask, other=other)
    return tl.max(((value & exponent) == exponent).to(tl.int32), axis=0)


@triton.jit
def _nonfinite_path(model_addr, start, remaining, exponent, W: tl.constexpr, BLOCK: tl.constexpr,
                    ALIGNED: tl.constexpr):
    bits = _pointer(model_addr, start, ALIGNED, W)
    local = tl.arange(0, BLOCK)
    if remaining >= BLOCK:
        found = _exponent_all_ones(bits, local, None, None, exponent)
    else:
        found = _exponent_all_ones(bits, local, local < remaining, 0, exponent)
    return found


@triton.jit
def _nonfinite_words(model_addr, start, remaining, aligned, exponent, W: tl.constexpr, BLOCK: tl.constexpr):
    if aligned:
        found = _nonfinite_path(model_addr, start, remaining, exponent, W, BLOCK, True)
    else:
        found = _nonfinite_path(model_addr, start, remaining, exponent, W, BLOCK, False)
    return found


@triton.jit
def _nonfinite(model_addr, start, remaining, aligned, mcode, BLOCK: tl.constexpr):
    if mcode == 0:
        found = _nonfinite_words(model_addr, start, remaining, aligned, 0x7F800000, tl.int32, BLOCK)
    elif mcode == 1:
        found = _nonfinite_words(model_addr, start, remaining, aligned, 0x7FF0000000000000, tl.int64, BLOCK)
    elif mcode == 2:
        found = _nonfinite_words(model_addr, start, remaining, aligned, 0x7C00, tl.int16, BLOCK)
    else:
        found = _nonfinite_words(model_addr, start, remaining, aligned, 0x7F80, tl.int16, BLOCK)
    return found


@triton.jit
def _decode(row, flat_bases_ptr, start, BLOCK: tl.constexpr):
    # One row of a tensor table (wavg_fused.plan.COLUMNS) for the block at element ``start``.
    model_addr = tl.load(row + _MODEL_PTR)
    first = tl.load(row + _OFFSET)
    numel = tl.load(row + _NUMEL)
    mcode = tl.load(row + _MODEL_DTYPE)
    scode = tl.load(row + _SHADOW_DTYPE)
    copy = tl.load(row + _ROLE) == 0
    aligned = (tl.load(row + _FLAGS) & 1) != 0
    itemsize = tl.load(row + _ITEMSIZE)
    shadow_addr = tl.load(flat_bases_ptr + tl.load(row + _FLAT)) + first * itemsize
    remaining = tl.minimum(numel - start, BLOCK).to(tl.int32)  # valid elements of this block
    return model_addr, shadow_addr, first, remaining, mcode, scode, copy, aligned, itemsize


@triton.jit
def _average(shadow_addr, model_addr, first, start, remaining, aligned, copy, mcode, scode, itemsize, method,
             p0, p1, p2, p3, n, seed, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    # One tensor's block of the update: floating types at the method's step weight from ``n``,
    # integers, bools and other types copied as words.
    if (mcode <= 3) & (scode <= 3):
        w = _step_weight(method, p0, p1, p2, p3, n)
        element0 = first + start
        if scode == 0:
            _floating(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, mcode,
                      tl.float32, STOCHASTIC, BLOCK)
        elif scode == 1:
            _floating(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, mcode,
                      tl.float64, STOCHASTIC, BLOCK)
        elif scode == 2:
            _floating(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, mcode,
                      tl.float16, STOCHASTIC, BLOCK)
        elif STOCHASTIC == _PER_SEED:  # the group kernel: each member rounds as its seed says
            if seed >= 0:
                _floating(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, mcode,
                          tl.bfloat16, True, BLOCK)
            else:
                _floating(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, mcode,
                          tl.bfloat16, False, BLOCK)
        else:
            _floating(shadow_addr, model_addr, start, remaining, aligned, w, copy, n, seed, element0, mcode,
                      tl.bfloat16, STOCHASTIC, BLOCK)
    else:
        _move_words(shadow_addr, model_addr, start, remaining, aligned, itemsize, False, BLOCK)


# What a launch does (compile-time MODE): the update, a transfer (copy_to or swap), the check.
_UPDATE, _TRANSFER, _CHECK = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_RUNTIME = ["num_blocks", "method", "p0_lo", "p0_hi", "p1_lo", "p1_hi", "p2_lo", "p2_hi", "p3_lo", "p3_hi",
            "seed_lo", "seed_hi", "bump", "guard", "has_skipped", "swap"]
_POINTERS = ["table_ptr", "blocks_ptr", "flat_bases_ptr", "n_ptr", "done_ptr", "skipped_ptr"]


@triton.jit(do_not_specialize=_RUNTIME, do_not_specialize_on_alignment=_POINTERS)
def _wavg_update_kernel(table_ptr, blocks_ptr, flat_bases_ptr, n_ptr, done_ptr, skipped_ptr, num_blocks, method,
                        p0_lo, p0_hi, p1_lo, p1_hi, p2_lo, p2_hi, p3_lo, p3_hi, seed_lo, seed_hi, bump, guard,
                        has_skipped, swap, MODE: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
                        NCOL: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 before any offset arithmetic
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(blocks_ptr + 2 * pid + 1), BLOCK)  # blocks start at multiples of BLOCK
    model_addr, shadow_addr, first, remaining, mcode, scode, copy, aligned, itemsize = _decode(
        table_ptr + t * NCOL, flat_bases_ptr, start, BLOCK)
    flag_ptr = done_ptr + 1  # workspace[1]: the non-finite flag (workspace[0] counts finished programs)

    if MODE == _CHECK:  # check only: flag an Inf or NaN among the averaged model values
        if (not copy) & (mcode <= 3):
            if _nonfinite(model_addr, start, remaining, aligned, mcode, BLOCK) != 0:
                tl.store(flag_ptr, 1)
    elif MODE == _TRANSFER:  # transfers write the model and never bump
        _transfer(shadow_addr, model_addr, start, remaining, aligned, swap, mcode, scode, itemsize, BLOCK)
    else:
        n = tl.load(n_ptr)  # every program reads it before the last one bumps it
        # set by a check launch before this one, the same for every program
        skip = (tl.load(flag_ptr) != 0) & (guard != 0)
        if skip:
            pass  # the whole update is skipped: no shadow is written
        else:
            _average(shadow_addr, model_addr, first, start, remaining, aligned, copy, mcode, scode, itemsize, method,
                     _float64(p0_lo, p0_hi), _float64(p1_lo, p1_hi), _float64(p2_lo, p2_hi), _float64(p3_lo, p3_hi),
                     n, _int64(seed_lo, seed_hi), STOCHASTIC, BLOCK)

        if (bump != 0) | (guard != 0):
            finished = tl.atomic_add(done_ptr, 1)  # acq_rel: this program's reads of n and the flag came first
            if finished == num_blocks - 1:
                if skip:
                    if has_skipped != 0:
                        tl.store(skipped_ptr, tl.load(skipped_ptr) + 1)
                    tl.store(flag_ptr, 0)
                elif bump != 0:
                    tl.store(n_ptr, n + 1)
                tl.store(done_ptr, 0)  # ready for the next launch and for graph replays


# Plan modes (wavg_fused.plan MODE_*) -> (kernel MODE, swap)
_KERNEL_MODE = {0: (0, 0), 1: (1, 0), 2: (1, 1), 3: (2, 0)}
MAX_PARAMS = 4  # csrc/wavg_rule.h kMaxParams


def _halves(bits: int) -> tuple[int, int]:
    """A 64-bit word as (low, high) signed int32 halves: always Triton's i32, never specialised."""
    lo, hi = bits & 0xFFFFFFFF, (bits >> 32) & 0xFFFFFFFF
    return lo - (1 << 32) * (lo >> 31), hi - (1 << 32) * (hi >> 31)


def _float_halves(params) -> tuple[int, ...]:
    values = tuple(params) + (0.0,) * (MAX_PARAMS - len(params))
    out: tuple[int, ...] = ()
    for bits in struct.unpack(f"<{MAX_PARAMS}q", struct.pack(f"<{MAX_PARAMS}d", *values)):
        out += _halves(bits)
    return out


def launch_args(table, blocks, flat_bases, n_averaged, workspace, method: int, params, seed: int, bump: bool,
                block: int, num_warps: int, mode: int = 0, guard: bool = False, n_skipped=None) -> tuple[tuple, dict]:
    """The positional and keyword arguments ``launch`` passes to ``_wavg_update_kernel`` (what a
    GPU compiles for: ``tests/test_triton_compile.py`` compiles exactly these)."""
    kernel_mode, swap = _KERNEL_MODE[mode]
    update = kernel_mode == 0
    stochastic = update and seed >= 0
    num_blocks = blocks.shape[0]
    assert num_blocks < 2**31 and len(params) <= MAX_PARAMS
    args = (
        table, blocks, flat_bases, n_averaged, workspace, n_averaged if n_skipped is None else n_skipped,
        num_blocks, int(method), *_float_halves(params), *_halves(seed if stochastic else 0),
        int(bump and update), int(guard and update), int(n_skipped is not None), swap,
    )
    return args, dict(MODE=kernel_mode, STOCHASTIC=int(stochastic), BLOCK=block, NCOL=table.shape[1],
                      num_warps=num_warps)


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device (and its current stream): enter the plan's
    device only when it is not the current one (a context switch costs more than the check)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(device.index)


def launch(table, blocks, flat_bases, n_averaged, workspace, method: int, params, seed: int, bump: bool,
           block: int, num_warps: int, mode: int = 0, guard: bool = False, n_skipped=None) -> None:
    """Run ``_wavg_update_kernel`` once over the plan (``blocks`` built for ``block`` elements),
    on the plan's device. ``params`` are the method's float64 hyperparameters (passed by value,
    so a changed decay costs no copy to the device); ``seed >= 0`` rounds bf16 shadows at random.

    ``mode`` 3 sets ``workspace[1]`` if an averaged model value is Inf or NaN; ``guard`` makes
    the update (mode 0) skip everything when that flag is set, bumping ``n_skipped`` instead.
    Transfers (modes 1, 2) and the check never bump.
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
    args, kwargs = launch_args(table, blocks, flat_bases, n_averaged, workspace, method, params, seed, bump,
                               block, num_warps, mode, guard, n_skipped)
    with _device_guard(table.device):
        _wavg_update_kernel[(num_blocks,)](*args, **kwargs)


# The group update (wavg_fused.group_plan.GroupPlan: several averages of one model in one launch).
# Member k's scalars are row k of a small int64 table on the device (``member_rows``): its method
# code, four float64 parameters (their bits), rounding seed, flags (bit 1: bump its counter, bit 2:
# write it in this launch) and its counter's address.
MEMBER_COLUMNS = ("method", "p0", "p1", "p2", "p3", "seed", "flags", "counter")
_M_METHOD, _M_P0, _M_P1, _M_P2, _M_P3, _M_SEED, _M_FLAGS, _M_COUNTER = (
    tl.constexpr(i) for i in range(len(MEMBER_COLUMNS))
)
_GROUP_RUNTIME = ["num_blocks", "members", "bump"]
_GROUP_POINTERS = ["table_ptr", "blocks_ptr", "flat_bases_ptr", "members_ptr", "done_ptr"]


@triton.jit
def _member_param(member, column):
    return tl.load(member + column).to(tl.float64, bitcast=True)


@triton.jit
def _member_counter(member):
    return tl.load(member + _M_COUNTER).to(tl.pointer_type(tl.int64))


@triton.jit(do_not_specialize=_GROUP_RUNTIME, do_not_specialize_on_alignment=_GROUP_POINTERS)
def _wavg_group_kernel(table_ptr, blocks_ptr, flat_bases_ptr, members_ptr, done_ptr, num_blocks, members, bump,
                       STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr, NCOL: tl.constexpr, MCOL: tl.constexpr):
    # Program i takes block i of the model's block table and runs it for each member in turn: the
    # first member reads the model block from memory, the later ones from cache. Each member's
    # block is exactly what the single update kernel computes for it (``_decode``, ``_average``).
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blocks_ptr + 2 * pid)
    start = tl.multiple_of(tl.load(blocks_ptr + 2 * pid + 1), BLOCK)
    # while, not `for k in range(members)`: triton 3.6's interpreter cannot take a runtime bound there
    k = 0
    while k < members:
        member = members_ptr + k * MCOL
        row = table_ptr + (t * members + k) * NCOL  # a zero row where member k lacks tensor t
        if ((tl.load(member + _M_FLAGS) & 2) != 0) & (tl.load(row + _NUMEL) > start):
            model_addr, shadow_addr, first, remaining, mcode, scode, copy, aligned, itemsize = _decode(
                row, flat_bases_ptr, start, BLOCK)
            n = tl.load(_member_counter(member))  # read before this program counts itself done
            _average(shadow_addr, model_addr, first, start, remaining, aligned, copy, mcode, scode, itemsize,
                     tl.load(member + _M_METHOD), _member_param(member, _M_P0), _member_param(member, _M_P1),
                     _member_param(member, _M_P2), _member_param(member, _M_P3), n, tl.load(member + _M_SEED),
                     STOCHASTIC, BLOCK)
        k += 1
    if bump != 0:
        finished = tl.atomic_add(done_ptr, 1)  # acq_rel: every counter this program read came first
        if finished == num_blocks - 1:  # nobody writes a counter before the last program: read it again
            j = 0
            while j < members:
                member = members_ptr + j * MCOL
                if (tl.load(member + _M_FLAGS) & 3) == 3:
                    counter = _member_counter(member)
                    tl.store(counter, tl.load(counter) + 1)
                j += 1
            tl.store(done_ptr, 0)  # ready for the next launch and for graph replays


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def member_rows(methods, params, seeds, flags, counters) -> tuple[int, ...]:
    """The group kernel's member table, flattened (``len(MEMBER_COLUMNS)`` int64 per member):
    host values only (``counters`` are tensors: their addresses, never their values)."""
    out: tuple[int, ...] = ()
    for method, values, seed, flag, counter in zip(methods, params, seeds, flags, counters):
        assert len(values) <= MAX_PARAMS
        values = tuple(values) + (0.0,) * (MAX_PARAMS - len(values))
        out += (int(method), *(_bits(v) for v in values), int(seed), int(flag), counter.data_ptr())
    return out


def launch_group_args(table, blocks, flat_bases, member_table, workspace, flags, stochastic: bool, block: int,
                      num_warps: int) -> tuple[tuple, dict]:
    """The arguments ``launch_group`` passes to ``_wavg_group_kernel`` (what the compile test compiles)."""
    members = member_table.shape[0]
    num_blocks = blocks.shape[0]
    assert num_blocks < 2**31 and table.shape[0] == (table.shape[0] // members) * members
    bump = int(any(flag & 3 == 3 for flag in flags))
    args = (table, blocks, flat_bases, member_table, workspace, num_blocks, members, bump)
    return args, dict(STOCHASTIC=2 if stochastic else 0, BLOCK=block, NCOL=table.shape[1], MCOL=member_table.shape[1],
                      num_warps=num_warps)


def launch_group(table, blocks, flat_bases, member_table, workspace, counters, flags, stochastic: bool, block: int,
                 num_warps: int) -> None:
    """Run ``_wavg_group_kernel`` once over a group's tables (``blocks`` built for ``block``
    elements): member k's row of ``member_table`` as ``member_rows`` builds it, ``counters`` and
    ``flags`` the same ones it holds (``stochastic``: some member rounds at random)."""
    if blocks.shape[0] == 0:
        for counter, flag in zip(counters, flags):
            if flag & 3 == 3:
                counter.add_(1)
        return
    args, kwargs = launch_group_args(table, blocks, flat_bases, member_table, workspace, flags, stochastic, block,
                                     num_warps)
    with _device_guard(table.device):
        _wavg_group_kernel[(blocks.shape[0],)](*args, **kwargs)
