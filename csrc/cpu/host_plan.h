// A CPU plan's checks and the per-tensor offsets its kernels walk, shared by the op (update_cpu.cpp)
// and the bound launch that runs after the watch in one parallel region (update_if_unmoved.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../plan_rows.h"
#include "parallel_policy.h"

namespace wavg_fused::cpu {

// What the kernel will dereference, checked on the host (the table is on the CPU here).
inline void check_plan(const at::TensorList flats, const at::Tensor& table) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.is_contiguous() &&
                  table.dim() == 2 && table.size(1) == kNumColumns,
              "wavg_fused.update_: table must be a contiguous CPU int64 tensor of shape [T, ", kNumColumns,
              "], got ", table.sizes(), " ", table.scalar_type(), " on ", table.device());
  for (const at::Tensor& flat : flats) {
    TORCH_CHECK(flat.device().is_cpu() && flat.is_contiguous(),
                "wavg_fused.update_: storage buffers must be contiguous CPU tensors");
  }
  check_rows_in_buffers(flats, table, "wavg_fused.update_");
}

inline int64_t* host_counter(const at::Tensor& counter, const char* name) {
  TORCH_CHECK(counter.device().is_cpu() && counter.scalar_type() == at::kLong && counter.numel() == 1,
              "wavg_fused.update_: ", name, " must be a one-element CPU int64 tensor");
  return counter.data_ptr<int64_t>();  // on the host: reading it costs no sync
}

struct HostPlan {
  std::vector<int64_t> first;  // first element of each tensor in the whole plan, then the total
  int64_t bytes = 0;           // what the pass moves: parallel_policy.h picks the threads from it
  std::vector<char*> flat_bases;
};

inline HostPlan host_plan(const at::TensorList flats, const at::Tensor& table, bool model_only) {
  HostPlan plan;
  const int64_t num_tensors = table.size(0);
  const int64_t* rows = table.data_ptr<int64_t>();
  plan.first.assign(num_tensors + 1, 0);
  for (int64_t t = 0; t < num_tensors; ++t) {
    plan.first[t + 1] = plan.first[t] + rows[t * kNumColumns + kNumel];
    plan.bytes += row_bytes(rows + t * kNumColumns, model_only);
  }
  for (const at::Tensor& flat : flats) plan.flat_bases.push_back(static_cast<char*>(flat.data_ptr()));
  return plan;
}

}  // namespace wavg_fused::cpu
