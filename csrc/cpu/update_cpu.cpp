// The `cpu` backend: one parallel region over the whole plan, split into equal element ranges
// (not one region per tensor). The element kernels are compiled for several instruction sets
// (kernel_<isa>.cpp); the widest one this CPU supports is picked once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "../method_params.h"
#include "../wavg_rule.h"
#include "kernel_api.h"

namespace wavg_fused::cpu {
namespace {

// Elements per thread at least: below this, waking threads costs more than it saves (ATen's
// TensorIterator uses the same 32K).
constexpr int64_t kGrainElems = 32768;

// WAVG_FUSED_CPU_ISA=default|avx2|avx512 forces one (tests run each; users can rule one out).
ProcessFn widest_kernel() {
  const char* forced = std::getenv("WAVG_FUSED_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    const std::string isa(forced);
    if (isa == "default") return isa_default::process_elements;
    if (isa == "avx2") return isa_avx2::process_elements;
    if (isa == "avx512") return isa_avx512::process_elements;
    TORCH_CHECK(false, "WAVG_FUSED_CPU_ISA must be default, avx2 or avx512, got ", isa);
  }
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return isa_avx512::process_elements;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return isa_avx2::process_elements;
  }
  return isa_default::process_elements;
}

// What the kernel will dereference, checked on the host (the table is on the CPU here).
void check_plan(const at::TensorList flats, const at::Tensor& table) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.is_contiguous() &&
                  table.dim() == 2 && table.size(1) == kNumColumns,
              "wavg_fused.update_: table must be a contiguous CPU int64 tensor of shape [T, ", kNumColumns,
              "], got ", table.sizes(), " ", table.scalar_type(), " on ", table.device());
  for (const at::Tensor& flat : flats) {
    TORCH_CHECK(flat.device().is_cpu() && flat.is_contiguous(),
                "wavg_fused.update_: storage buffers must be contiguous CPU tensors");
  }
  const int64_t* rows = table.data_ptr<int64_t>();
  for (int64_t t = 0; t < table.size(0); ++t) {
    const int64_t* row = rows + t * kNumColumns;
    if (row[kNumel] == 0) continue;
    TORCH_CHECK(row[kFlat] >= 0 && row[kFlat] < static_cast<int64_t>(flats.size()),
                "wavg_fused.update_: tensor ", t, " names storage buffer ", row[kFlat], " of ", flats.size());
    const at::Tensor& flat = flats[row[kFlat]];
    TORCH_CHECK(static_cast<int64_t>(flat.element_size()) == row[kItemsize] && row[kShadowOffset] >= 0 &&
                    row[kShadowOffset] + row[kNumel] <= flat.numel() && row[kModelPtr] != 0,
                "wavg_fused.update_: tensor ", t, " lies outside its storage buffer");
  }
}

// `blocks` and `workspace` serve the CUDA kernel; the CPU splits the element range itself,
// which balances threads better when tensor sizes differ wildly.
void update_cpu(at::TensorList flats, const at::Tensor& table, const at::Tensor& /*blocks*/,
                const at::Tensor& n_averaged, const at::Tensor& /*workspace*/, int64_t method,
                at::ArrayRef<double> params, bool bump, int64_t rounding_seed, int64_t mode) {
  TORCH_CHECK(mode >= kModeAverage && mode <= kModeSwap, "wavg_fused.update_: unknown mode ", mode);
  TORCH_CHECK(mode == kModeAverage || !bump, "wavg_fused.update_: only mode 0 (average) bumps n_averaged");
  check_plan(flats, table);
  TORCH_CHECK(n_averaged.device().is_cpu() && n_averaged.scalar_type() == at::kLong && n_averaged.numel() == 1,
              "wavg_fused.update_: n_averaged must be a one-element CPU int64 tensor");
  int64_t* counter = n_averaged.data_ptr<int64_t>();  // on the host: reading it costs no sync
  const Step k = Step::make(method, method_params(params), *counter, rounding_seed);

  const int64_t num_tensors = table.size(0);
  const int64_t* rows = table.data_ptr<int64_t>();
  std::vector<int64_t> first(num_tensors + 1, 0);  // first element of each tensor in the whole plan
  for (int64_t t = 0; t < num_tensors; ++t) first[t + 1] = first[t] + rows[t * kNumColumns + kNumel];

  std::vector<char*> flat_bases;
  for (const at::Tensor& flat : flats) flat_bases.push_back(static_cast<char*>(flat.data_ptr()));

  static const ProcessFn process_elements = widest_kernel();
  if (mode == kModeSwap) {
    for (int64_t t = 0; t < num_tensors; ++t) {
      TORCH_CHECK(rows[t * kNumColumns + kModelDtype] == rows[t * kNumColumns + kShadowDtype],
                  "wavg_fused.update_: swap needs equal model and shadow dtypes (tensor ", t, ")");
    }
  }
  const PlanView plan{rows, first.data(), num_tensors, flat_bases.data(), k, mode};
  at::parallel_for(0, first.back(), kGrainElems,
                   [&](int64_t begin, int64_t end) { process_elements(plan, begin, end); });
  if (bump) *counter += 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_fused, CPU, m) { m.impl("update_", &update_cpu); }

}  // namespace wavg_fused::cpu
