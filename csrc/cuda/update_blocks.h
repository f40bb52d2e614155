// The CUDA kernels' per-block work, written once for nvcc and g++. update_cuda.cu wraps it in
// __global__ kernels (one CUDA block per row of the block table); update_emulated.cpp runs the
// very same functions block by block, lane by lane on the CPU (the `cuda-emulated` test backend),
// so the CPU test suite runs the CUDA kernel's code: table decoding, dtype dispatch, vector and
// tail paths, every mode, stochastic rounding and the last-block bookkeeping.
//
// Nothing here reads threadIdx, blockDim or blockIdx: a thread's place in its block comes in as
// a Lane, the block's row as an index; the wrappers own synchronisation and atomics.
//
// Bits: the element update is an explicit fused multiply-add (fmaf/fma, never left to the
// compiler's contraction), so nvcc's device code and g++'s host code round alike; the lerp it
// computes is the one torch's CPU (AVX2/AVX-512) and CUDA kernels compute.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../wavg_rule.h"

#if defined(__CUDACC__)
#define WAVG_BLOCK_FN __host__ __device__ __forceinline__
#define WAVG_UNROLL _Pragma("unroll")
#else
#define WAVG_BLOCK_FN inline
#define WAVG_UNROLL _Pragma("GCC unroll 16")
#endif

namespace wavg_fused::blocks {

constexpr int kThreads = 256;
// Elements per CUDA block; must match the Python side (backends/fused.py CudaBackend.block_elems).
constexpr int64_t kBlockElems = 4096;

// A thread's place in its block: threadIdx.x and blockDim.x on the GPU, a loop counter when emulated.
struct Lane {
  unsigned index;
  unsigned count;
};

// 16 bytes moved by one vector load or store (uint4 on the GPU, which g++ does not know).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
using Bytes16 = Pack<uint32_t, 4>;

// Elements of the wider of S and M per 16 bytes.
template <typename S, typename M>
constexpr int pack_width() {
  return static_cast<int>(16 / (sizeof(S) > sizeof(M) ? sizeof(S) : sizeof(M)));
}

template <typename S>
using opmath_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// The storage buffers' base addresses, passed to the kernels by value.
struct FlatBases {
  char* ptr[kMaxFlats];
};

WAVG_BLOCK_FN int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

WAVG_BLOCK_FN float fused_multiply_add(float a, float b, float c) { return ::fmaf(a, b, c); }
WAVG_BLOCK_FN double fused_multiply_add(double a, double b, double c) { return ::fma(a, b, c); }

// wavg_rule.h `averaged` with each multiply-add fused explicitly: s + w (m - s) from the shadow's
// end, m - (m - s)(1 - w) from the model's (torch.lerp's branches).
template <typename Op>
WAVG_BLOCK_FN Op lerp_fused(Op s, Op m, Op w, Op one_minus_w, bool from_shadow) {
  const Op d = m - s;
  return from_shadow ? fused_multiply_add(w, d, s) : fused_multiply_add(-d, one_minus_w, m);
}

// One row of the block table, decoded: which elements of which tensor this block owns.
struct BlockWork {
  int64_t begin, end;  // elements [begin, end) of the tensor
  char* shadow;        // the shadow tensor's first byte (in its storage buffer)
  char* model;         // the model tensor's first byte (written by transfers only)
  int64_t first;       // the shadow's element offset in its storage buffer (keys stochastic rounding)
  int64_t model_code, shadow_code, itemsize;
  bool aligned;        // both bases 16-byte aligned: the vector paths may run
  bool average;        // role kAverage (else the model is copied)
};

// Elements [begin, begin + kBlockElems) of the tensor in `row`, clipped to its end. `flats` may be
// null for a pass that never touches the shadow (kModeCheck), and a row may be empty (a group
// member without this tensor): `shadow` is null then.
WAVG_BLOCK_FN BlockWork decode_row(const int64_t* row, int64_t begin, const FlatBases* flats) {
  BlockWork w;
  w.begin = begin;
  w.end = row[kNumel] == 0 ? begin : min64(begin + kBlockElems, row[kNumel]);
  w.first = row[kShadowOffset];
  w.itemsize = row[kItemsize];
  w.shadow = flats != nullptr && row[kNumel] != 0 ? flats->ptr[row[kFlat]] + w.first * w.itemsize : nullptr;
  w.model = reinterpret_cast<char*>(row[kModelPtr]);
  w.model_code = row[kModelDtype];
  w.shadow_code = row[kShadowDtype];
  w.aligned = (row[kFlags] & kFlagAligned) != 0;
  w.average = row[kRole] == kAverage;
  return w;
}

WAVG_BLOCK_FN BlockWork decode_block(const int64_t* table, const int64_t* blocks, int64_t block,
                                     const FlatBases* flats) {
  return decode_row(table + blocks[2 * block] * kNumColumns, blocks[2 * block + 1], flats);
}

WAVG_BLOCK_FN bool is_floating(int64_t code) { return code <= kBFloat16; }

template <typename Fn>
WAVG_BLOCK_FN void with_float_type(int64_t code, Fn&& fn) {
  switch (code) {
    case kFloat32: fn(float{}); break;
    case kFloat64: fn(double{}); break;
    case kFloat16: fn(c10::Half{}); break;
    case kBFloat16: fn(c10::BFloat16{}); break;
    default: break;  // the host only sends floating codes here
  }
}

// ---- the lane's share of one block's range -------------------------------------------------
// Every function below handles the `count` elements (or bytes) of one block, its pointers already
// at the block's first element: the lane takes every lane.count-th 16-byte vector, then every
// lane.count-th element of the tail. A block spans at most kBlockElems elements, so offsets inside
// it are 32-bit and unsigned (which ptxas keeps in fewer registers than int64_t or int indices). `vector`: both pointers are 16-byte aligned
// (the plan's aligned flag; block starts are multiples of kBlockElems elements), so 16-byte loads
// and stores are safe.

// Bytes [0, count).
WAVG_BLOCK_FN void copy_bytes(char* __restrict__ dst, const char* __restrict__ src, unsigned count, bool vector,
                              Lane lane) {
  unsigned tail = 0;
  if (vector) {
    const unsigned vectors = count / 16;
    for (unsigned v = lane.index; v < vectors; v += lane.count) {
      reinterpret_cast<Bytes16*>(dst)[v] = reinterpret_cast<const Bytes16*>(src)[v];
    }
    tail = vectors * 16;
  }
  for (unsigned i = tail + lane.index; i < count; i += lane.count) dst[i] = src[i];
}

// kModeSwap: exchange bytes [0, count) of two tensors of one dtype.
WAVG_BLOCK_FN void swap_bytes(char* __restrict__ a, char* __restrict__ b, unsigned count, bool vector, Lane lane) {
  unsigned tail = 0;
  if (vector) {
    const unsigned vectors = count / 16;
    for (unsigned v = lane.index; v < vectors; v += lane.count) {
      const Bytes16 x = reinterpret_cast<const Bytes16*>(a)[v];
      reinterpret_cast<Bytes16*>(a)[v] = reinterpret_cast<const Bytes16*>(b)[v];
      reinterpret_cast<Bytes16*>(b)[v] = x;
    }
    tail = vectors * 16;
  }
  for (unsigned i = tail + lane.index; i < count; i += lane.count) {
    const char x = a[i];
    a[i] = b[i];
    b[i] = x;
  }
}

// out <- in across float dtypes, through Via (the shadow's opmath, as the cpu kernel casts): a
// copy-role shadow from its model, or kModeCopyToModel's model from its shadow. Reads `in` only.
template <typename Out, typename In, typename Via>
WAVG_BLOCK_FN void convert_range(Out* __restrict__ out, const In* __restrict__ in, unsigned count, bool vector,
                                 Lane lane) {
  constexpr int N = pack_width<Out, In>();
  unsigned tail = 0;
  if (vector) {
    const unsigned vectors = count / N;
    for (unsigned v = lane.index; v < vectors; v += lane.count) {
      const auto x = *reinterpret_cast<const Pack<In, N>*>(in + v * N);
      Pack<Out, N> y;
      WAVG_UNROLL
      for (int j = 0; j < N; ++j) y.v[j] = static_cast<Out>(static_cast<Via>(x.v[j]));
      *reinterpret_cast<Pack<Out, N>*>(out + v * N) = y;
    }
    tail = vectors * N;
  }
  for (unsigned i = tail + lane.index; i < count; i += lane.count) out[i] = static_cast<Out>(static_cast<Via>(in[i]));
}

// The averaged value of one element, in opmath.
template <typename S, typename M>
WAVG_BLOCK_FN opmath_t<S> average_value(S s, M m, opmath_t<S> w, opmath_t<S> one_minus_w, bool from_shadow) {
  using Op = opmath_t<S>;
  return lerp_fused<Op>(static_cast<Op>(s), static_cast<Op>(m), w, one_minus_w, from_shadow);
}

// shadow <- average(shadow, model), rounded to nearest.
template <typename S, typename M>
WAVG_BLOCK_FN void average_range(S* __restrict__ shadow, const M* __restrict__ model, unsigned count, bool vector,
                                 const Step& k, Lane lane) {
  using Op = opmath_t<S>;
  constexpr int N = pack_width<S, M>();
  const Op w = k.weight<Op>(), omw = k.one_minus<Op>();
  unsigned tail = 0;
  if (vector) {
    const unsigned vectors = count / N;
    for (unsigned v = lane.index; v < vectors; v += lane.count) {
      auto s = *reinterpret_cast<const Pack<S, N>*>(shadow + v * N);
      const auto m = *reinterpret_cast<const Pack<M, N>*>(model + v * N);
      WAVG_UNROLL
      for (int j = 0; j < N; ++j) s.v[j] = static_cast<S>(average_value(s.v[j], m.v[j], w, omw, k.from_shadow));
      *reinterpret_cast<Pack<S, N>*>(shadow + v * N) = s;
    }
    tail = vectors * N;
  }
  for (unsigned i = tail + lane.index; i < count; i += lane.count) {
    shadow[i] = static_cast<S>(average_value(shadow[i], model[i], w, omw, k.from_shadow));
  }
}

WAVG_BLOCK_FN c10::BFloat16 round_bf16(float value, uint32_t random) {
  return c10::BFloat16(stochastic_round_bf16(value, random), c10::BFloat16::from_bits());
}

// A bf16 shadow <- average(shadow, model), rounded stochastically; `first` is the storage index
// of the block's first element. One Philox call serves the 4 elements of a group (storage
// elements 4g .. 4g+3), whose 4 words are indexed by constants only (a dynamic index would put
// them in local memory). Vector path, when `first` is a multiple of 4 (16-byte aligned shadows in
// a 16-byte aligned buffer always are): packs of 8 or 4 hold whole groups, a pack of 2 (an fp64
// model) half of one. Tail: the lane takes whole groups, clipped to the tail.
template <typename M>
WAVG_BLOCK_FN void average_bf16_stochastic(c10::BFloat16* __restrict__ shadow, const M* __restrict__ model,
                                           unsigned count, int64_t first, bool vector, const Step& k, Lane lane) {
  using S = c10::BFloat16;
  constexpr int N = pack_width<S, M>();
  static_assert(N == 8 || N == 4 || N == 2, "bf16 packs hold 8, 4 or 2 elements");
  const float w = k.weight<float>(), omw = k.one_minus<float>();
  unsigned tail = 0;
  if (vector && (first & 3) == 0) {
    const unsigned vectors = count / N;
    const int64_t group0 = first >> 2;
    for (unsigned v = lane.index; v < vectors; v += lane.count) {
      auto s = *reinterpret_cast<const Pack<S, N>*>(shadow + v * N);
      const auto m = *reinterpret_cast<const Pack<M, N>*>(model + v * N);
      if constexpr (N >= 4) {
        WAVG_UNROLL
        for (int g = 0; g < N / 4; ++g) {
          const Random4 random = rounding_bits(k.rounding_seed, k.n_averaged, group0 + (v * N) / 4 + g);
          WAVG_UNROLL
          for (int j = 0; j < 4; ++j) {
            s.v[4 * g + j] = round_bf16(average_value(s.v[4 * g + j], m.v[4 * g + j], w, omw, k.from_shadow),
                                        random.v[j]);
          }
        }
      } else {
        const Random4 random = rounding_bits(k.rounding_seed, k.n_averaged, group0 + (v >> 1));
        const bool upper = (v & 1) != 0;  // the pack is words 2, 3 of its group, else 0, 1
        s.v[0] = round_bf16(average_value(s.v[0], m.v[0], w, omw, k.from_shadow), upper ? random.v[2] : random.v[0]);
        s.v[1] = round_bf16(average_value(s.v[1], m.v[1], w, omw, k.from_shadow), upper ? random.v[3] : random.v[1]);
      }
      *reinterpret_cast<Pack<S, N>*>(shadow + v * N) = s;
    }
    tail = vectors * N;
  }
  // groups overlapping [tail, count): group q covers block elements 4q - lead .. 4q - lead + 3
  const auto lead = static_cast<unsigned>(first & 3);
  const int64_t group0 = first >> 2;
  const unsigned groups = (lead + count + 3) >> 2;
  for (unsigned q = ((lead + tail) >> 2) + lane.index; q < groups; q += lane.count) {
    const Random4 random = rounding_bits(k.rounding_seed, k.n_averaged, group0 + q);
    WAVG_UNROLL
    for (unsigned j = 0; j < 4; ++j) {
      const unsigned i = 4 * q + j - lead;  // wraps around below the block's first element: skipped
      if (i >= tail && i < count) {
        shadow[i] = round_bf16(average_value(shadow[i], model[i], w, omw, k.from_shadow), random.v[j]);
      }
    }
  }
}

// Any Inf or NaN among the `count` values, read as raw bits.
template <typename Bits>
WAVG_BLOCK_FN bool range_nonfinite(const Bits* __restrict__ values, unsigned count, bool vector, Bits exponent,
                                   Lane lane) {
  constexpr int N = 16 / sizeof(Bits);
  bool found = false;
  unsigned tail = 0;
  if (vector) {
    const unsigned vectors = count / N;
    for (unsigned v = lane.index; v < vectors; v += lane.count) {
      const auto pack = *reinterpret_cast<const Pack<Bits, N>*>(values + v * N);
      WAVG_UNROLL
      for (int j = 0; j < N; ++j) found |= nonfinite_bits(pack.v[j], exponent);
    }
    tail = vectors * N;
  }
  for (unsigned i = tail + lane.index; i < count; i += lane.count) found |= nonfinite_bits(values[i], exponent);
  return found;
}

// ---- one lane's work per mode ----------------------------------------------------------------

// kModeAverage: average (role kAverage) or copy (role kCopy: the shadow is not read) the block's range.
WAVG_BLOCK_FN void update_lane(const BlockWork& b, const Step& k, Lane lane) {
  const auto count = static_cast<unsigned>(b.end - b.begin);
  if (!is_floating(b.model_code) || !is_floating(b.shadow_code) || (!b.average && b.model_code == b.shadow_code)) {
    // integers, bools, other types, and copies of equal float dtypes: the bits as they are (NaN
    // payloads too, so swap's backup restores exactly)
    const int64_t offset = b.begin * b.itemsize;
    copy_bytes(b.shadow + offset, b.model + offset, count * static_cast<unsigned>(b.itemsize),
               b.aligned && offset % 16 == 0, lane);
    return;
  }
  with_float_type(b.shadow_code, [&](auto shadow_tag) {
    using S = decltype(shadow_tag);
    with_float_type(b.model_code, [&](auto model_tag) {
      using M = decltype(model_tag);
      S* shadow = reinterpret_cast<S*>(b.shadow) + b.begin;
      const M* model = reinterpret_cast<const M*>(b.model) + b.begin;
      if (!b.average) {
        if constexpr (!std::is_same_v<S, M>) convert_range<S, M, opmath_t<S>>(shadow, model, count, b.aligned, lane);
        return;
      }
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        if (k.rounding_seed >= 0) {
          average_bf16_stochastic(shadow, model, count, b.first + b.begin, b.aligned, k, lane);
          return;
        }
      }
      average_range(shadow, model, count, b.aligned, k, lane);
    });
  });
}

// kModeCopyToModel and kModeSwap: write the model from the shadow (swap: the host checked the
// dtypes are equal).
WAVG_BLOCK_FN void transfer_lane(const BlockWork& b, int64_t mode, Lane lane) {
  const auto count = static_cast<unsigned>(b.end - b.begin);
  const int64_t offset = b.begin * b.itemsize;
  const bool bytes_vector = b.aligned && offset % 16 == 0;
  if (mode == kModeSwap) {
    swap_bytes(b.shadow + offset, b.model + offset, count * static_cast<unsigned>(b.itemsize), bytes_vector, lane);
  } else if (b.model_code == b.shadow_code) {
    copy_bytes(b.model + offset, b.shadow + offset, count * static_cast<unsigned>(b.itemsize), bytes_vector, lane);
  } else {
    with_float_type(b.shadow_code, [&](auto shadow_tag) {
      using S = decltype(shadow_tag);
      with_float_type(b.model_code, [&](auto model_tag) {
        using M = decltype(model_tag);
        if constexpr (!std::is_same_v<S, M>) {
          convert_range<M, S, opmath_t<S>>(reinterpret_cast<M*>(b.model) + b.begin,
                                           reinterpret_cast<const S*>(b.shadow) + b.begin, count, b.aligned, lane);
        }
      });
    });
  }
}

// kModeCheck: whether this lane saw an Inf or NaN among the averaged model values of the block.
template <typename Bits>
WAVG_BLOCK_FN bool check_bits(const BlockWork& b, Bits exponent, Lane lane) {
  return range_nonfinite(reinterpret_cast<const Bits*>(b.model) + b.begin, static_cast<unsigned>(b.end - b.begin),
                         b.aligned, exponent, lane);
}

WAVG_BLOCK_FN bool check_lane(const BlockWork& b, Lane lane) {
  if (!b.average) return false;
  switch (b.model_code) {
    case kFloat32: return check_bits<uint32_t>(b, kExponentF32, lane);
    case kFloat64: return check_bits<uint64_t>(b, kExponentF64, lane);
    case kFloat16: return check_bits<uint16_t>(b, kExponentF16, lane);
    case kBFloat16: return check_bits<uint16_t>(b, kExponentBF16, lane);
    default: return false;  // integers are always finite
  }
}

// ---- what the update does once per block ----------------------------------------------------

// The update kernel's arguments besides the tables.
struct UpdateArgs {
  int64_t* n_averaged;
  unsigned int* blocks_done;  // workspace[kBlocksDoneSlot]
  int* nonfinite;             // workspace[kNonfiniteSlot] with the guard, else null
  int64_t* n_skipped;         // may be null
  int64_t method;
  MethodParams params;
  int64_t rounding_seed;
  bool bump;
};

// Per block, before any lane runs (thread 0 on the GPU): the step weight and the guard's decision.
struct BlockStart {
  Step step;
  bool skip;  // the guard found a non-finite value: this update writes no shadow
};

WAVG_BLOCK_FN BlockStart start_update_block(const UpdateArgs& a) {
  // every block reads n_averaged and the flag before it counts as finished, so before the last
  // block bumps or clears them
  const int64_t n = *a.n_averaged;
  return BlockStart{Step::make(a.method, a.params, n, a.rounding_seed), a.nonfinite != nullptr && *a.nonfinite != 0};
}

// Whether the block must count itself as finished (and the last one finish the update).
WAVG_BLOCK_FN bool counts_blocks(const UpdateArgs& a) { return a.bump || a.nonfinite != nullptr; }

// After every lane of the block ran, with `done_before` what the atomic increment of
// *blocks_done returned: the last block bumps n_averaged, or on a guarded skip bumps n_skipped and
// clears the flag, and resets the count for the next launch (and for CUDA graph replays).
WAVG_BLOCK_FN void finish_update_block(const UpdateArgs& a, const BlockStart& start, unsigned int done_before,
                                       unsigned int num_blocks) {
  if (done_before != num_blocks - 1) return;
  if (start.skip) {
    if (a.n_skipped != nullptr) *a.n_skipped += 1;
    *a.nonfinite = 0;
  } else if (a.bump) {
    *a.n_averaged = start.step.n_averaged + 1;
  }
  *a.blocks_done = 0;
}

// ---- a group: several averages of one model in one launch ---------------------------------
// The table has `members` rows per model tensor (row t * members + k: member k's shadow of tensor
// t, no elements where member k does not keep it); the block table addresses tensors. A block
// runs its range once per member, so the model's bytes come from memory for the first member and
// from cache for the others.
constexpr int kMaxMembers = 8;  // group_args.h kMaxGroupMembers

struct GroupArgs {
  int64_t* counters[kMaxMembers];  // each member's n_averaged (or a spare zero, tracking)
  unsigned int* blocks_done;       // workspace[kBlocksDoneSlot]
  int64_t methods[kMaxMembers];
  MethodParams params[kMaxMembers];
  int64_t rounding_seeds[kMaxMembers];
  unsigned bump_mask;    // bit k: bump member k's counter
  unsigned active_mask;  // bit k: write member k's shadow in this launch
  int members;
};

WAVG_BLOCK_FN BlockWork decode_member_block(const int64_t* table, const int64_t* blocks, int64_t block, int members,
                                            int member, const FlatBases* flats) {
  return decode_row(table + (blocks[2 * block] * members + member) * kNumColumns, blocks[2 * block + 1], flats);
}

// Member k's step for this launch, read (like start_update_block) before the block counts itself done.
WAVG_BLOCK_FN Step member_step(const GroupArgs& a, int member) {
  return Step::make(a.methods[member], a.params[member], *a.counters[member], a.rounding_seeds[member]);
}

WAVG_BLOCK_FN bool member_writes(const GroupArgs& a, int member, const BlockWork& work) {
  return ((a.active_mask >> member) & 1u) != 0 && work.end > work.begin;
}

// The last block to finish bumps the members' counters (from the values every block read) and
// resets the count for the next launch.
WAVG_BLOCK_FN void finish_group_block(const GroupArgs& a, const Step* steps, unsigned int done_before,
                                      unsigned int num_blocks) {
  if (done_before != num_blocks - 1) return;
  for (int k = 0; k < a.members; ++k) {
    if (((a.bump_mask & a.active_mask) >> k) & 1u) *a.counters[k] = steps[k].n_averaged + 1;
  }
  *a.blocks_done = 0;
}

}  // namespace wavg_fused::blocks
