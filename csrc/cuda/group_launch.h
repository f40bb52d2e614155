// Host side of the group ops on the CUDA kernels' code (update_group_ on CUDA tensors, and its CPU
// emulation): the argument checks and the kernel's GroupArgs. The tables' rows stay unchecked
// here, as for update_ (on the GPU they live in device memory).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "../group_args.h"
#include "../wavg_rule.h"
#include "update_blocks.h"

namespace wavg_fused::blocks {

static_assert(kMaxMembers == kMaxGroupMembers, "update_blocks.h and group_args.h disagree on the member limit");

struct GroupLaunch {
  FlatBases flats;
  GroupArgs args;
};

inline GroupLaunch group_launch(c10::DeviceType type, const char* op, at::TensorList flats, const at::Tensor& table,
                                const at::Tensor& block_table, at::TensorList counters, const at::Tensor& workspace,
                                at::IntArrayRef methods, at::ArrayRef<double> params, at::IntArrayRef flags,
                                at::IntArrayRef rounding_seeds) {
  const std::string where = c10::DeviceTypeName(type);
  const auto on = [&](const at::Tensor& t) { return t.device().type() == type && t.device() == table.device(); };
  TORCH_CHECK(table.device().type() == type && table.scalar_type() == at::kLong && table.is_contiguous() &&
                  table.dim() == 2 && table.size(1) == kNumColumns,
              op, ": table must be a contiguous ", where, " int64 tensor [T * members, ", kNumColumns, "]");
  const int64_t members = checked_members(op, table, counters, methods, params, flags, rounding_seeds);
  TORCH_CHECK(on(block_table) && block_table.scalar_type() == at::kLong && block_table.is_contiguous() &&
                  block_table.dim() == 2 && block_table.size(1) == 2 && block_table.size(0) < (int64_t{1} << 31),
              op, ": blocks must be a contiguous int64 tensor [B, 2] on the table's device");
  TORCH_CHECK(on(workspace) && workspace.scalar_type() == at::kInt && workspace.is_contiguous() && workspace.numel() >= 1,
              op, ": workspace must be a contiguous int32 tensor on the table's device");
  TORCH_CHECK(flats.size() <= static_cast<size_t>(kMaxFlats), op, ": at most ", kMaxFlats, " storage buffers, got ",
              flats.size());
  GroupLaunch launch{};
  for (size_t f = 0; f < flats.size(); ++f) {
    TORCH_CHECK(on(flats[f]) && flats[f].is_contiguous(), op, ": storage buffers must be contiguous and on the table's device");
    launch.flats.ptr[f] = static_cast<char*>(flats[f].data_ptr());
  }
  GroupArgs& a = launch.args;
  a.members = static_cast<int>(members);
  a.blocks_done = reinterpret_cast<unsigned int*>(workspace.data_ptr<int32_t>() + kBlocksDoneSlot);
  for (int64_t k = 0; k < members; ++k) {
    a.counters[k] = counters[k].data_ptr<int64_t>();
    a.methods[k] = methods[k];
    a.params[k] = member_params(params, k);
    a.rounding_seeds[k] = rounding_seeds[k];
    if ((flags[k] & kMemberBump) != 0) a.bump_mask |= 1u << k;
    if ((flags[k] & kMemberActive) != 0) a.active_mask |= 1u << k;
  }
  return launch;
}

// A group of empty tensors (no block): only the counters move.
inline void finish_empty_group(at::TensorList counters, const GroupArgs& a) {
  for (int k = 0; k < a.members; ++k) {
    if (((a.bump_mask & a.active_mask) >> k) & 1u) counters[k].add_(1);
  }
}

}  // namespace wavg_fused::blocks
