// The `cpu` backend's group update: several averages of one model (AveragerGroup) in one parallel
// region over the model's elements. Each piece of a model tensor is read once and every member's
// shadow of it written from cache (kernel.h process_members), so the pass moves the model's bytes
// once and each member's shadow bytes, where separate updates would read the model once each.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../group_args.h"
#include "../plan_rows.h"
#include "../wavg_rule.h"
#include "kernel_api.h"
#include "parallel_policy.h"

namespace wavg_fused::cpu {
namespace {

void update_group_cpu(at::TensorList flats, const at::Tensor& table, const at::Tensor& /*blocks*/,
                      at::TensorList counters, const at::Tensor& /*workspace*/, at::IntArrayRef methods,
                      at::ArrayRef<double> params, at::IntArrayRef flags, at::IntArrayRef rounding_seeds) {
  const char* op = "wavg_fused.update_group_";
  const int64_t members = checked_members(op, table, counters, methods, params, flags, rounding_seeds);
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.is_contiguous() &&
                  table.size(1) == kNumColumns,
              op, ": table must be a contiguous CPU int64 tensor [T * members, ", kNumColumns, "]");
  for (const at::Tensor& flat : flats) {
    TORCH_CHECK(flat.device().is_cpu() && flat.is_contiguous(), op, ": storage buffers must be contiguous CPU tensors");
  }
  check_rows_in_buffers(flats, table, op);

  Step steps[kMaxGroupMembers];
  bool active[kMaxGroupMembers];
  for (int64_t k = 0; k < members; ++k) {
    active[k] = (flags[k] & kMemberActive) != 0;
    steps[k] = Step::make(methods[k], member_params(params, k), *counters[k].data_ptr<int64_t>(), rounding_seeds[k]);
  }
  const int64_t num_tensors = table.size(0) / members;
  const int64_t* rows = table.data_ptr<int64_t>();
  std::vector<int64_t> first(num_tensors + 1, 0);  // a tensor's elements: those of the members that keep it
  int64_t bytes = 0;  // as separate updates would count them: the threads do the members' work
  for (int64_t t = 0; t < num_tensors; ++t) {
    int64_t numel = 0;
    for (int64_t k = 0; k < members; ++k) {
      const int64_t* row = rows + (t * members + k) * kNumColumns;
      numel = std::max(numel, row[kNumel]);
      if (active[k]) bytes += row_bytes(row, false);
    }
    first[t + 1] = first[t] + numel;
  }
  std::vector<char*> flat_bases;
  for (const at::Tensor& flat : flats) flat_bases.push_back(static_cast<char*>(flat.data_ptr()));

  const Kernels& kernels = selected_kernels();
  const PlanView plan{rows, first.data(), num_tensors, flat_bases.data(), steps[0], kModeAverage,
                      members, steps, active};
  parallel_elements(first.back(), bytes, [&](int64_t begin, int64_t end) { kernels.process(plan, begin, end); });
  for (int64_t k = 0; k < members; ++k) {
    if ((flags[k] & kMemberBump) != 0 && active[k]) *counters[k].data_ptr<int64_t>() += 1;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_fused, CPU, m) { m.impl("update_group_", &update_group_cpu); }

}  // namespace wavg_fused::cpu
