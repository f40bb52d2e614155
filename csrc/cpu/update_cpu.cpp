// The `cpu` backend: one parallel region over the whole plan, split into equal element ranges
// (not one region per tensor). The element kernels are compiled for several instruction sets
// (kernel_<isa>.cpp); the widest one this CPU supports is picked once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "../method_params.h"
#include "../wavg_rule.h"
#include "kernel_api.h"
#include "host_plan.h"
#include "parallel_policy.h"

namespace wavg_fused::cpu {
namespace {

// WAVG_FUSED_CPU_ISA=default|avx2|avx512 forces one (tests run each; users can rule one out).
Kernels widest_kernels() {
  constexpr Kernels kDefault{isa_default::process_elements, isa_default::any_nonfinite, "default"};
  constexpr Kernels kAvx2{isa_avx2::process_elements, isa_avx2::any_nonfinite, "avx2"};
  constexpr Kernels kAvx512{isa_avx512::process_elements, isa_avx512::any_nonfinite, "avx512"};
  const char* forced = std::getenv("WAVG_FUSED_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    const std::string isa(forced);
    if (isa == "default") return kDefault;
    if (isa == "avx2") return kAvx2;
    if (isa == "avx512") return kAvx512;
    TORCH_CHECK(false, "WAVG_FUSED_CPU_ISA must be default, avx2 or avx512, got ", isa);
  }
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return kAvx2;
  }
  return kDefault;
}

}  // namespace

// Picked on first use and kept: the environment is read once, as by the first update.
const Kernels& selected_kernels() {
  static const Kernels kernels = widest_kernels();
  return kernels;
}

namespace {

// `blocks` serves the CUDA kernel; the CPU splits the element range itself, which balances
// threads better when tensor sizes differ wildly. Of `workspace` only the non-finite flag is used.
void update_cpu(at::TensorList flats, const at::Tensor& table, const at::Tensor& /*blocks*/,
                const at::Tensor& n_averaged, const at::Tensor& workspace, int64_t method,
                at::ArrayRef<double> params, bool bump, int64_t rounding_seed, int64_t mode, bool guard,
                const std::optional<at::Tensor>& n_skipped) {
  TORCH_CHECK(mode >= kModeAverage && mode <= kModeCheck, "wavg_fused.update_: unknown mode ", mode);
  TORCH_CHECK(mode == kModeAverage || !bump, "wavg_fused.update_: only mode 0 (average) bumps n_averaged");
  check_plan(flats, table);
  int64_t* counter = host_counter(n_averaged, "n_averaged");
  int32_t* flag = nullptr;
  if (guard || mode == kModeCheck) {
    TORCH_CHECK(workspace.device().is_cpu() && workspace.scalar_type() == at::kInt && workspace.is_contiguous() &&
                    workspace.numel() >= kWorkspaceSlots,
                "wavg_fused.update_: workspace must be a contiguous CPU int32 tensor of ", kWorkspaceSlots,
                " elements for the non-finite guard");
    flag = workspace.data_ptr<int32_t>() + kNonfiniteSlot;
  }
  int64_t* skipped = n_skipped.has_value() ? host_counter(*n_skipped, "n_skipped") : nullptr;
  const Step k = Step::make(method, method_params(params), *counter, rounding_seed);

  const int64_t num_tensors = table.size(0);
  const int64_t* rows = table.data_ptr<int64_t>();
  const HostPlan host = host_plan(flats, table, mode == kModeCheck);
  const std::vector<int64_t>& first = host.first;
  const int64_t bytes = host.bytes;

  const Kernels& kernels = selected_kernels();
  const PlanView plan{rows, first.data(), num_tensors, host.flat_bases.data(), k, mode};
  if (mode == kModeCheck) {
    std::atomic<bool> found{false};
    parallel_elements(first.back(), bytes, [&](int64_t begin, int64_t end) {
      if (!found.load(std::memory_order_relaxed) && kernels.any_nonfinite(plan, begin, end)) found = true;
    });
    if (found) *flag = 1;  // ORed in: a model spread over devices combines its parts' flags
    return;
  }
  if (guard && mode == kModeAverage && *flag != 0) {  // skip the whole update: shadow untouched
    *flag = 0;
    if (skipped != nullptr) *skipped += 1;
    return;
  }
  if (mode == kModeSwap) {
    for (int64_t t = 0; t < num_tensors; ++t) {
      TORCH_CHECK(rows[t * kNumColumns + kModelDtype] == rows[t * kNumColumns + kShadowDtype],
                  "wavg_fused.update_: swap needs equal model and shadow dtypes (tensor ", t, ")");
    }
  }
  parallel_elements(first.back(), bytes, [&](int64_t begin, int64_t end) { kernels.process(plan, begin, end); });
  if (bump) *counter += 1;
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_fused, CPU, m) { m.impl("update_", &update_cpu); }

}  // namespace wavg_fused::cpu
