// Host side of the CUDA op and of its CPU emulation: the argument checks they share (the tables'
// contents stay unchecked here: on the GPU they live in device memory), the kernel arguments, and
// the counts of a plan without elements, where no block runs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "../method_params.h"
#include "../wavg_rule.h"
#include "update_blocks.h"

namespace wavg_fused::blocks {

// Checks what the kernels dereference besides the tables' rows and returns the storage buffers'
// base addresses. `type`: CUDA for the cuda op, CPU for its emulation.
inline FlatBases check_launch(c10::DeviceType type, at::TensorList flats, const at::Tensor& table,
                              const at::Tensor& block_table, const at::Tensor& n_averaged,
                              const at::Tensor& workspace, at::ArrayRef<double> params, bool bump, int64_t mode,
                              bool guard, const std::optional<at::Tensor>& n_skipped) {
  const std::string where = c10::DeviceTypeName(type);
  const auto on = [type](const at::Tensor& t) { return t.device().type() == type; };
  TORCH_CHECK(mode >= kModeAverage && mode <= kModeCheck, "wavg_fused.update_: unknown mode ", mode);
  TORCH_CHECK(mode == kModeAverage || !bump, "wavg_fused.update_: only mode 0 (average) bumps n_averaged");
  method_params(params);  // at most kMaxParams
  TORCH_CHECK(on(table) && table.scalar_type() == at::kLong && table.is_contiguous() && table.dim() == 2 &&
                  table.size(1) == kNumColumns,
              "wavg_fused.update_: table must be a contiguous ", where, " int64 tensor [T, ", kNumColumns, "]");
  TORCH_CHECK(on(block_table) && block_table.scalar_type() == at::kLong && block_table.is_contiguous() &&
                  block_table.dim() == 2 && block_table.size(1) == 2,
              "wavg_fused.update_: blocks must be a contiguous ", where, " int64 tensor [B, 2]");
  TORCH_CHECK(on(workspace) && workspace.scalar_type() == at::kInt && workspace.is_contiguous() &&
                  workspace.numel() >= ((guard || mode == kModeCheck) ? kWorkspaceSlots : 1),
              "wavg_fused.update_: workspace must be a contiguous ", where, " int32 tensor of ", kWorkspaceSlots,
              " elements (1 without the non-finite guard)");
  TORCH_CHECK(!n_skipped.has_value() || (on(*n_skipped) && n_skipped->scalar_type() == at::kLong &&
                                         n_skipped->numel() == 1 && n_skipped->device() == table.device()),
              "wavg_fused.update_: n_skipped must be a one-element int64 tensor on the table's device");
  TORCH_CHECK(on(n_averaged) && n_averaged.scalar_type() == at::kLong && n_averaged.numel() == 1,
              "wavg_fused.update_: n_averaged must be a one-element ", where, " int64 tensor");
  TORCH_CHECK(block_table.device() == table.device() && n_averaged.device() == table.device() &&
                  workspace.device() == table.device(),
              "wavg_fused.update_: table, blocks, n_averaged and workspace must be on one device");
  TORCH_CHECK(flats.size() <= static_cast<size_t>(kMaxFlats), "wavg_fused.update_: at most ", kMaxFlats,
              " storage buffers, got ", flats.size());
  TORCH_CHECK(block_table.size(0) < (int64_t{1} << 31), "wavg_fused.update_: too many blocks: ",
              block_table.size(0));
  FlatBases bases{};
  for (size_t f = 0; f < flats.size(); ++f) {
    TORCH_CHECK(on(flats[f]) && flats[f].device() == table.device() && flats[f].is_contiguous(),
                "wavg_fused.update_: storage buffers must be contiguous and on the table's device");
    bases.ptr[f] = static_cast<char*>(flats[f].data_ptr());
  }
  return bases;
}

// The update kernel's arguments besides the tables (workspace as check_launch accepted it).
inline UpdateArgs update_args(const at::Tensor& n_averaged, const at::Tensor& workspace, int64_t method,
                              at::ArrayRef<double> params, bool bump, int64_t rounding_seed, bool guard,
                              const std::optional<at::Tensor>& n_skipped) {
  int32_t* slots = workspace.data_ptr<int32_t>();
  UpdateArgs args{};
  args.n_averaged = n_averaged.data_ptr<int64_t>();
  args.blocks_done = reinterpret_cast<unsigned int*>(slots + kBlocksDoneSlot);
  args.nonfinite = guard ? slots + kNonfiniteSlot : nullptr;
  args.n_skipped = n_skipped.has_value() ? n_skipped->data_ptr<int64_t>() : nullptr;
  args.method = method;
  args.params = method_params(params);
  args.rounding_seed = rounding_seed;
  args.bump = bump;
  return args;
}

// A plan of empty tensors (no block): the counts only, decided on the tensors' device. With the
// guard, the flag can be set here only by a caller combining devices' flags.
inline void finish_empty_launch(const at::Tensor& n_averaged, const at::Tensor& workspace, bool bump, int64_t mode,
                                bool guard, const std::optional<at::Tensor>& n_skipped) {
  if (mode != kModeAverage) return;
  if (!guard) {
    if (bump) n_averaged.add_(1);
    return;
  }
  const at::Tensor flag = workspace.narrow(0, kNonfiniteSlot, 1).squeeze(0).to(at::kLong);
  if (bump) n_averaged.sub_(flag).add_(1);
  if (n_skipped.has_value()) n_skipped->add_(flag);
  workspace.narrow(0, kNonfiniteSlot, 1).zero_();
}

}  // namespace wavg_fused::blocks
