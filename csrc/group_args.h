// Host side of the group ops' member arguments (update_group_, update_group_emulated_): checked
// once here for every device, then read as plain arrays.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "method_params.h"
#include "wavg_rule.h"

namespace wavg_fused {

// Averages updated in one pass at most; the CUDA kernel takes their arguments by value.
constexpr int64_t kMaxGroupMembers = 8;
// update_group_'s per-member `flags`
constexpr int64_t kMemberBump = 1;    // add 1 to the member's counter after the update
constexpr int64_t kMemberActive = 2;  // write the member's shadow in this update (else leave it)

// The number of members, after checking that every per-member list has one entry each and the
// table one row per (tensor, member).
inline int64_t checked_members(const char* op, const at::Tensor& table, at::TensorList counters,
                               at::IntArrayRef methods, at::ArrayRef<double> params, at::IntArrayRef flags,
                               at::IntArrayRef rounding_seeds) {
  const auto members = static_cast<int64_t>(methods.size());
  TORCH_CHECK(members >= 1 && members <= kMaxGroupMembers, op, ": 1 to ", kMaxGroupMembers, " members, got ",
              members);
  TORCH_CHECK(static_cast<int64_t>(counters.size()) == members && static_cast<int64_t>(flags.size()) == members &&
                  static_cast<int64_t>(rounding_seeds.size()) == members &&
                  static_cast<int64_t>(params.size()) == members * kMaxParams,
              op, ": counters, flags and rounding_seeds need one entry per member and params ", kMaxParams,
              " per member (", members, " members)");
  TORCH_CHECK(table.dim() == 2 && table.size(0) % members == 0, op, ": the table needs ", members,
              " rows per tensor, got ", table.sizes());
  for (const at::Tensor& counter : counters) {
    TORCH_CHECK(counter.scalar_type() == at::kLong && counter.numel() == 1 && counter.device() == table.device(),
                op, ": each counter must be a one-element int64 tensor on the table's device");
  }
  return members;
}

inline MethodParams member_params(at::ArrayRef<double> params, int64_t member) {
  return method_params(params.slice(member * kMaxParams, kMaxParams));
}

}  // namespace wavg_fused
