// The `cpu` backend: one parallel region over the whole plan, split into equal element ranges
// (not one region per tensor), vectorised with at::vec; 16-bit values are averaged in fp32.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../wavg_rule.h"

namespace wavg_fused {
namespace {

using at::vec::Vectorized;

// Elements per thread at least: below this, waking threads costs more than it saves (ATen's
// TensorIterator uses the same 32K).
constexpr int64_t kGrainElems = 32768;

template <typename S>
using opmath_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

struct Weights {
  double w;
  bool from_shadow;
  int64_t rounding_seed;  // < 0: round to nearest; else stochastic rounding of bf16 shadows
  int64_t n_averaged;
  template <typename T>
  T weight() const { return static_cast<T>(w); }
  template <typename T>
  T one_minus() const { return static_cast<T>(1.0 - w); }
};

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// Scalar tail (and the general mixed-dtype path): one element at a time in opmath.
template <typename S, typename M>
void average_scalar(S* shadow, const M* model, int64_t begin, int64_t end, const Weights& k) {
  using Op = opmath_t<S>;
  const Op w = k.weight<Op>(), omw = k.one_minus<Op>();
  for (int64_t i = begin; i < end; ++i) {
    shadow[i] = static_cast<S>(
        averaged<Op>(static_cast<Op>(shadow[i]), static_cast<Op>(model[i]), w, omw, k.from_shadow));
  }
}

template <typename S, typename M>
void average_range(S* shadow, const M* model, int64_t n, const Weights& k) {
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
void average_bf16_stochastic(c10::BFloat16* shadow, const M* model, int64_t first, int64_t n, const Weights& k) {
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

// Elements [begin, end) of one tensor (a row of the plan's table).
void process(const int64_t* row, char* const* flat_bases, const char* model_base, int64_t begin, int64_t end,
             const Weights& k) {
  const int64_t model_code = row[kModelDtype], shadow_code = row[kShadowDtype];
  char* shadow_base = flat_bases[row[kFlat]] + row[kShadowOffset] * row[kItemsize];
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

int64_t dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kLong: return kInt64;
    case at::kInt: return kInt32;
    case at::kShort: return kInt16;
    case at::kChar: return kInt8;
    case at::kByte: return kUInt8;
    case at::kBool: return kBool;
    default: return kOther;
  }
}

// Everything the kernel will dereference, checked on the host (the table is on the CPU here).
void check_plan(const at::TensorList flats, const at::TensorList models, const at::Tensor& table) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.is_contiguous() &&
                  table.dim() == 2 && table.size(1) == kNumColumns,
              "wavg_fused.update_: table must be a contiguous CPU int64 tensor of shape [T, ", kNumColumns,
              "], got ", table.sizes(), " ", table.scalar_type(), " on ", table.device());
  TORCH_CHECK(static_cast<int64_t>(models.size()) == table.size(0), "wavg_fused.update_: ", models.size(),
              " models for a table of ", table.size(0), " tensors");
  for (const at::Tensor& flat : flats) {
    TORCH_CHECK(flat.device().is_cpu() && flat.is_contiguous(), "wavg_fused.update_: storage buffers must be "
                "contiguous CPU tensors");
  }
  const int64_t* rows = table.data_ptr<int64_t>();
  for (int64_t t = 0; t < table.size(0); ++t) {
    const int64_t* row = rows + t * kNumColumns;
    if (row[kNumel] == 0) continue;
    // The CPU kernel reads models[t] itself (not the address in the table), so copies of the
    // inputs (torch.library.opcheck, functionalization) are read correctly; they must only match
    // the plan's element count, dtype and dense layout.
    const at::Tensor& model = models[t];
    TORCH_CHECK(model.device().is_cpu() && model.numel() == row[kNumel] && model.is_non_overlapping_and_dense() &&
                    dtype_code(model.scalar_type()) == row[kModelDtype],
                "wavg_fused.update_: models[", t, "] does not match the plan (", model.numel(), " elements of ",
                model.scalar_type(), "; the plan has ", row[kNumel], ")");
    TORCH_CHECK(row[kFlat] >= 0 && row[kFlat] < static_cast<int64_t>(flats.size()),
                "wavg_fused.update_: tensor ", t, " names storage buffer ", row[kFlat], " of ", flats.size());
    const at::Tensor& flat = flats[row[kFlat]];
    TORCH_CHECK(static_cast<int64_t>(flat.element_size()) == row[kItemsize] && row[kShadowOffset] >= 0 &&
                    row[kShadowOffset] + row[kNumel] <= flat.numel(),
                "wavg_fused.update_: shadow of tensor ", t, " lies outside its storage buffer");
  }
}

// `blocks` and `workspace` serve the CUDA kernel; the CPU splits the element range itself,
// which balances threads better when tensor sizes differ wildly.
void update_cpu(at::TensorList flats, at::TensorList models, const at::Tensor& table, const at::Tensor& /*blocks*/,
                const at::Tensor& n_averaged, const at::Tensor& /*workspace*/, int64_t method, double p0, double p1,
                bool bump, int64_t rounding_seed) {
  check_plan(flats, models, table);
  TORCH_CHECK(n_averaged.device().is_cpu() && n_averaged.scalar_type() == at::kLong && n_averaged.numel() == 1,
              "wavg_fused.update_: n_averaged must be a one-element CPU int64 tensor");
  int64_t* counter = n_averaged.data_ptr<int64_t>();  // on the host: reading it costs no sync
  const double w = step_weight(method, p0, p1, *counter);
  const Weights k{w, lerp_from_shadow(w), rounding_seed, *counter};

  const int64_t num_tensors = table.size(0);
  const int64_t* rows = table.data_ptr<int64_t>();
  std::vector<int64_t> first(num_tensors + 1, 0);  // first element of each tensor in the whole plan
  for (int64_t t = 0; t < num_tensors; ++t) first[t + 1] = first[t] + rows[t * kNumColumns + kNumel];

  std::vector<char*> flat_bases;
  for (const at::Tensor& flat : flats) flat_bases.push_back(static_cast<char*>(flat.data_ptr()));
  std::vector<const char*> model_bases;
  for (const at::Tensor& model : models) model_bases.push_back(static_cast<const char*>(model.const_data_ptr()));

  at::parallel_for(0, first.back(), kGrainElems, [&](int64_t begin, int64_t end) {
    int64_t t = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (; t < num_tensors && first[t] < end; ++t) {
      const int64_t lo = std::max(begin, first[t]) - first[t];
      const int64_t hi = std::min(end, first[t + 1]) - first[t];
      if (hi > lo) process(rows + t * kNumColumns, flat_bases.data(), model_bases[t], lo, hi, k);
    }
  });
  if (bump) *counter += 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_fused, CPU, m) { m.impl("update_", &update_cpu); }

}  // namespace wavg_fused
