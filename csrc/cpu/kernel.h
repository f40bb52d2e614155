// The CPU element kernels, vectorised with at::vec; 16-bit values are averaged in fp32. Included
// once per instruction set by kernel_<isa>.cpp, which defines WAVG_ISA (our namespace) and
// CPU_CAPABILITY (at::vec's) first, so each build gets at::vec's matching implementation.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../wavg_rule.h"
#include "kernel_api.h"

namespace wavg_fused::cpu::WAVG_ISA {
namespace {

using at::vec::Vectorized;

template <typename S>
using opmath_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Scalar tail (and the general mixed-dtype path): one element at a time in opmath.
template <typename S, typename M>
void average_scalar(S* shadow, const M* model, int64_t begin, int64_t end, const Step& k) {
  using Op = opmath_t<S>;
  const Op w = k.weight<Op>(), omw = k.one_minus<Op>();
  for (int64_t i = begin; i < end; ++i) {
    shadow[i] = static_cast<S>(
        averaged<Op>(static_cast<Op>(shadow[i]), static_cast<Op>(model[i]), w, omw, k.from_shadow));
  }
}

template <typename S, typename M>
void average_range(S* shadow, const M* model, int64_t n, const Step& k) {
  int64_t i = 0;
  if constexpr (std::is_same_v<S, M> && (std::is_same_v<S, float> || std::is_same_v<S, double>)) {
    using V = Vectorized<S>;
    const V w(k.weight<S>()), omw(k.one_minus<S>());
    for (; i + V::size() <= n; i += V::size()) {
      averaged<V>(V::loadu(shadow + i), V::loadu(model + i), w, omw, k.from_shadow).store(shadow + i);
    }
  } else if constexpr (std::is_same_v<S, float> && is_reduced_v<M>) {
    // fp32 shadow of a 16-bit model: widen the model, average in fp32.
    using V = Vectorized<float>;
    using VM = Vectorized<M>;
    const V w(k.weight<float>()), omw(k.one_minus<float>());
    for (; i + VM::size() <= n; i += VM::size()) {
      auto [m0, m1] = at::vec::convert_to_float<M>(VM::loadu(model + i));
      averaged<V>(V::loadu(shadow + i), m0, w, omw, k.from_shadow).store(shadow + i);
      averaged<V>(V::loadu(shadow + i + V::size()), m1, w, omw, k.from_shadow).store(shadow + i + V::size());
    }
  } else if constexpr (std::is_same_v<S, M> && is_reduced_v<S>) {
    // 16-bit shadow and model: widen both, average in fp32, round once.
    using V = Vectorized<float>;
    using VS = Vectorized<S>;
    const V w(k.weight<float>()), omw(k.one_minus<float>());
    for (; i + VS::size() <= n; i += VS::size()) {
      auto [s0, s1] = at::vec::convert_to_float<S>(VS::loadu(shadow + i));
      auto [m0, m1] = at::vec::convert_to_float<S>(VS::loadu(model + i));
      at::vec::convert_from_float<S>(
          averaged<V>(s0, m0, w, omw, k.from_shadow), averaged<V>(s1, m1, w, omw, k.from_shadow))
          .store(shadow + i);
    }
  }
  average_scalar(shadow, model, i, n, k);
}

// bf16 shadow with stochastic rounding; `first` is the element's index in its storage buffer,
// which (with the seed and the update count) keys its random bits.
template <typename M>
void average_bf16_stochastic(c10::BFloat16* shadow, const M* model, int64_t first, int64_t n, const Step& k) {
  const float w = k.weight<float>(), omw = k.one_minus<float>();
  for (int64_t i = 0; i < n;) {
    const Random4 random = rounding_bits(k.rounding_seed, k.n_averaged, (first + i) >> 2);
    for (int64_t lane = (first + i) & 3; lane < 4 && i < n; ++lane, ++i) {
      const float value = averaged<float>(static_cast<float>(shadow[i]), static_cast<float>(model[i]), w, omw,
                                          k.from_shadow);
      shadow[i] = c10::BFloat16(stochastic_round_bf16(value, random.v[lane]), c10::BFloat16::from_bits());
    }
  }
}

template <typename S, typename M>
void copy_range(S* shadow, const M* model, int64_t n) {
  if constexpr (std::is_same_v<S, M>) {
    std::memcpy(shadow, model, n * sizeof(S));
  } else {
    using Op = opmath_t<S>;
    for (int64_t i = 0; i < n; ++i) shadow[i] = static_cast<S>(static_cast<Op>(model[i]));
  }
}

template <typename Fn>
void with_float_type(int64_t code, Fn&& fn) {
  switch (code) {
    case kFloat32: return fn(float{});
    case kFloat64: return fn(double{});
    case kFloat16: return fn(c10::Half{});
    case kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, "wavg_fused: dtype code ", code, " is not a floating-point type");
  }
}

void swap_bytes(char* a, char* b, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {  // memcpy through registers: no aliasing or alignment assumptions
    uint64_t x, y;
    std::memcpy(&x, a + i, 8);
    std::memcpy(&y, b + i, 8);
    std::memcpy(a + i, &y, 8);
    std::memcpy(b + i, &x, 8);
  }
  for (; i < n; ++i) std::swap(a[i], b[i]);
}

// Modes that write the model (kModeCopyToModel, kModeSwap) for elements [begin, end) of one row.
void transfer(const int64_t* row, char* shadow_base, char* model_base, int64_t begin, int64_t end, int64_t mode) {
  const int64_t model_code = row[kModelDtype], shadow_code = row[kShadowDtype];
  if (model_code == shadow_code || mode == kModeSwap) {  // swap: the host checked the dtypes are equal
    const int64_t size = row[kItemsize];
    if (mode == kModeSwap) return swap_bytes(shadow_base + begin * size, model_base + begin * size, (end - begin) * size);
    std::memcpy(model_base + begin * size, shadow_base + begin * size, (end - begin) * size);
    return;
  }
  with_float_type(shadow_code, [&](auto shadow_tag) {
    using S = decltype(shadow_tag);
    with_float_type(model_code, [&](auto model_tag) {
      using M = decltype(model_tag);
      const S* shadow = reinterpret_cast<const S*>(shadow_base);
      M* model = reinterpret_cast<M*>(model_base);
      for (int64_t i = begin; i < end; ++i) model[i] = static_cast<M>(static_cast<opmath_t<S>>(shadow[i]));
    });
  });
}

// Elements [begin, end) of one tensor (a row of the plan's table).
void process(const int64_t* row, char* const* flat_bases, int64_t begin, int64_t end, const Step& k, int64_t mode) {
  const int64_t model_code = row[kModelDtype], shadow_code = row[kShadowDtype];
  const auto* model_base = reinterpret_cast<const char*>(row[kModelPtr]);
  char* shadow_base = flat_bases[row[kFlat]] + row[kShadowOffset] * row[kItemsize];
  if (mode != kModeAverage) {  // these modes write the model: its address is writable memory
    return transfer(row, shadow_base, const_cast<char*>(model_base), begin, end, mode);
  }
  const bool floating = model_code <= kBFloat16 && shadow_code <= kBFloat16;
  if (!floating) {  // integers, bools and unknown types: always a byte copy of equal dtypes
    const int64_t size = row[kItemsize];
    std::memcpy(shadow_base + begin * size, model_base + begin * size, (end - begin) * size);
    return;
  }
  with_float_type(shadow_code, [&](auto shadow_tag) {
    using S = decltype(shadow_tag);
    with_float_type(model_code, [&](auto model_tag) {
      using M = decltype(model_tag);
      S* shadow = reinterpret_cast<S*>(shadow_base) + begin;
      const M* model = reinterpret_cast<const M*>(model_base) + begin;
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        if (row[kRole] == kAverage && k.rounding_seed >= 0) {
          return average_bf16_stochastic(shadow, model, row[kShadowOffset] + begin, end - begin, k);
        }
      }
      if (row[kRole] == kAverage) {
        average_range(shadow, model, end - begin, k);
      } else {
        copy_range(shadow, model, end - begin);
      }
    });
  });
}

// OR-reduction without an early exit, in an accumulator as wide as the elements: that loop
// vectorises (a bool accumulator made GCC's 4x slower), and finite models, the common case whose
// cost matters, are read in full anyway.
template <typename Bits>
bool any_nonfinite_bits(const Bits* values, int64_t n, Bits exponent) {
  Bits hits = 0;
  for (int64_t i = 0; i < n; ++i) hits |= static_cast<Bits>(nonfinite_bits(values[i], exponent));
  return hits != 0;
}

bool row_nonfinite(const int64_t* row, int64_t begin, int64_t end) {
  if (row[kRole] != kAverage) return false;
  const auto* model = reinterpret_cast<const char*>(row[kModelPtr]);
  const int64_t n = end - begin;
  switch (row[kModelDtype]) {
    case kFloat32: return any_nonfinite_bits(reinterpret_cast<const uint32_t*>(model) + begin, n, kExponentF32);
    case kFloat64: return any_nonfinite_bits(reinterpret_cast<const uint64_t*>(model) + begin, n, kExponentF64);
    case kFloat16: return any_nonfinite_bits(reinterpret_cast<const uint16_t*>(model) + begin, n, kExponentF16);
    case kBFloat16: return any_nonfinite_bits(reinterpret_cast<const uint16_t*>(model) + begin, n, kExponentBF16);
    default: return false;  // integers are always finite
  }
}

// fn(first row of tensor t, lo, hi) for each piece [lo, hi) of a tensor inside [begin, end).
template <typename Fn>
void for_each_piece(const PlanView& plan, int64_t begin, int64_t end, Fn&& fn) {
  int64_t t = std::upper_bound(plan.first, plan.first + plan.num_tensors + 1, begin) - plan.first - 1;
  for (; t < plan.num_tensors && plan.first[t] < end; ++t) {
    const int64_t lo = std::max(begin, plan.first[t]) - plan.first[t];
    const int64_t hi = std::min(end, plan.first[t + 1]) - plan.first[t];
    if (hi > lo) fn(plan.rows + t * plan.members * kNumColumns, lo, hi);
  }
}

// A group's members take each tile of a model tensor in turn, so the tile is read from memory
// once and from cache by the others (an fp32 tile and one member's shadow of it fit in L1).
constexpr int64_t kMemberTileElems = 2048;

void process_members(const PlanView& plan, const int64_t* rows, int64_t lo, int64_t hi) {
  for (int64_t tile = lo; tile < hi; tile += kMemberTileElems) {
    const int64_t tile_end = std::min(hi, tile + kMemberTileElems);
    for (int64_t k = 0; k < plan.members; ++k) {
      const int64_t* row = rows + k * kNumColumns;
      if (plan.active[k] && row[kNumel] != 0) process(row, plan.flat_bases, tile, tile_end, plan.steps[k], plan.mode);
    }
  }
}

}  // namespace

bool any_nonfinite(const PlanView& plan, int64_t begin, int64_t end) {
  bool found = false;
  for_each_piece(plan, begin, end, [&](const int64_t* row, int64_t lo, int64_t hi) {
    found = found || row_nonfinite(row, lo, hi);
  });
  return found;
}

void process_elements(const PlanView& plan, int64_t begin, int64_t end) {
  if (plan.members > 1) {
    for_each_piece(plan, begin, end, [&](const int64_t* rows, int64_t lo, int64_t hi) {
      process_members(plan, rows, lo, hi);
    });
    return;
  }
  // No software prefetch of the next tensor: asking for a small tensor's 4 KB one piece ahead
  // measured 2-6% slower than the hardware prefetcher alone on 2,000 tensors of 1K fp32, after
  // every condition of benchmarks/small_tensors_cpu.py (2026-12-03, op 1.04-1.08x of a flat lerp_
  // without it, 1.06-1.15x with it).
  for_each_piece(plan, begin, end, [&](const int64_t* row, int64_t lo, int64_t hi) {
    process(row, plan.flat_bases, lo, hi, plan.weights, plan.mode);
  });
}

}  // namespace wavg_fused::cpu::WAVG_ISA
