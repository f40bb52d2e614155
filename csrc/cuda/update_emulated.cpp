// The `cuda-emulated` test backend: the CUDA kernels' per-block code (update_blocks.h) run on the
// CPU over the same tables (tensor table, 4096-element block table, all on the CPU), as the
// update_cuda.cu wrappers run it on the GPU: every block decodes its row and computes its Step
// once, then lanes 0..kThreads-1 run one after another, then the block counts itself finished
// with an atomic increment and the last one does the bookkeeping. Blocks run in parallel
// (at::parallel_for). Compiled by the host compiler always, also when CUDA is not built.
//
// What it cannot show: real concurrency between the threads of a block (lanes run in turn) and
// between blocks beyond what the CPU threads give, the GPU's memory ordering and fences, warp
// effects, occupancy and timing, and nvcc's own code generation (its libm and conversion
// intrinsics; the rule's multiply-adds are explicit fmaf/fma calls, so contraction is not a gap).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../method_params.h"
#include "../plan_rows.h"
#include "../wavg_rule.h"
#include "group_launch.h"
#include "update_args.h"
#include "update_blocks.h"

namespace wavg_fused::blocks {
namespace {

// Blocks per CPU task at least: 8 blocks are the cpu backend's 32K-element grain.
constexpr int64_t kGrainBlocks = 8;
constexpr auto kLanes = static_cast<unsigned>(kThreads);

// The rows the emulation will dereference on the host (on the GPU a bad table faults the kernel;
// here it would corrupt the process): every block's tensor index, and each row inside its buffer.
void check_tables(at::TensorList flats, const at::Tensor& table, const at::Tensor& block_table, int64_t mode) {
  const int64_t* rows = table.data_ptr<int64_t>();
  const int64_t* pairs = block_table.data_ptr<int64_t>();
  const int64_t num_tensors = table.size(0);
  for (int64_t b = 0; b < block_table.size(0); ++b) {
    TORCH_CHECK(pairs[2 * b] >= 0 && pairs[2 * b] < num_tensors && pairs[2 * b + 1] >= 0 &&
                    pairs[2 * b + 1] < rows[pairs[2 * b] * kNumColumns + kNumel],
                "wavg_fused.update_emulated_: block ", b, " names no element of the table");
  }
  check_rows_in_buffers(flats, table, "wavg_fused.update_emulated_");
  for (int64_t t = 0; t < num_tensors; ++t) {
    const int64_t* row = rows + t * kNumColumns;
    TORCH_CHECK(mode != kModeSwap || row[kNumel] == 0 || row[kModelDtype] == row[kShadowDtype],
                "wavg_fused.update_emulated_: swap needs equal model and shadow dtypes (tensor ", t, ")");
  }
}

template <typename Fn>
void for_each_block(int64_t num_blocks, Fn&& fn) {
  at::parallel_for(0, num_blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) fn(block);
  });
}

void update_emulated(at::TensorList flats, const at::Tensor& table, const at::Tensor& block_table,
                     const at::Tensor& n_averaged, const at::Tensor& workspace, int64_t method,
                     at::ArrayRef<double> params, bool bump, int64_t rounding_seed, int64_t mode, bool guard,
                     const std::optional<at::Tensor>& n_skipped) {
  const FlatBases flat_bases = check_launch(c10::DeviceType::CPU, flats, table, block_table, n_averaged, workspace,
                                            params, bump, mode, guard, n_skipped);
  check_tables(flats, table, block_table, mode);
  const int64_t num_blocks = block_table.size(0);
  if (num_blocks == 0) {
    finish_empty_launch(n_averaged, workspace, bump, mode, guard, n_skipped);
    return;
  }
  const int64_t* rows = table.data_ptr<int64_t>();
  const int64_t* pairs = block_table.data_ptr<int64_t>();
  if (mode == kModeCheck) {  // check_kernel
    int* nonfinite = workspace.data_ptr<int32_t>() + kNonfiniteSlot;
    for_each_block(num_blocks, [&](int64_t block) {
      const BlockWork work = decode_block(rows, pairs, block, nullptr);
      for (unsigned lane = 0; lane < kLanes; ++lane) {
        if (check_lane(work, Lane{lane, kLanes})) __atomic_store_n(nonfinite, 1, __ATOMIC_RELAXED);
      }
    });
    return;
  }
  if (mode != kModeAverage) {  // transfer_kernel
    for_each_block(num_blocks, [&](int64_t block) {
      const BlockWork work = decode_block(rows, pairs, block, &flat_bases);
      for (unsigned lane = 0; lane < kLanes; ++lane) transfer_lane(work, mode, Lane{lane, kLanes});
    });
    return;
  }
  // update_kernel
  const UpdateArgs args = update_args(n_averaged, workspace, method, params, bump, rounding_seed, guard, n_skipped);
  for_each_block(num_blocks, [&](int64_t block) {
    const BlockWork work = decode_block(rows, pairs, block, &flat_bases);
    const BlockStart start = start_update_block(args);
    if (!start.skip) {
      for (unsigned lane = 0; lane < kLanes; ++lane) update_lane(work, start.step, Lane{lane, kLanes});
    }
    if (counts_blocks(args)) {
      // acquire-release, as __threadfence + atomicAdd: the last block sees every block's reads done
      const unsigned int done_before = __atomic_fetch_add(args.blocks_done, 1u, __ATOMIC_ACQ_REL);
      finish_update_block(args, start, done_before, static_cast<unsigned int>(num_blocks));
    }
  });
}


// update_group_kernel (update_group_cuda.cu) on the CPU: per block, every member's row and step,
// then each member's range in turn, lanes one after another.
void update_group_emulated(at::TensorList flats, const at::Tensor& table, const at::Tensor& block_table,
                           at::TensorList counters, const at::Tensor& workspace, at::IntArrayRef methods,
                           at::ArrayRef<double> params, at::IntArrayRef flags, at::IntArrayRef rounding_seeds) {
  const char* op = "wavg_fused.update_group_emulated_";
  const GroupLaunch launch = group_launch(c10::DeviceType::CPU, op, flats, table, block_table, counters, workspace,
                                          methods, params, flags, rounding_seeds);
  const GroupArgs& args = launch.args;
  const int64_t* rows = table.data_ptr<int64_t>();
  const int64_t* pairs = block_table.data_ptr<int64_t>();
  const int64_t num_tensors = table.size(0) / args.members;
  for (int64_t b = 0; b < block_table.size(0); ++b) {
    int64_t numel = 0;
    if (pairs[2 * b] >= 0 && pairs[2 * b] < num_tensors) {
      for (int k = 0; k < args.members; ++k) {
        numel = std::max(numel, rows[(pairs[2 * b] * args.members + k) * kNumColumns + kNumel]);
      }
    }
    TORCH_CHECK(pairs[2 * b + 1] >= 0 && pairs[2 * b + 1] < numel, op, ": block ", b, " names no element of the table");
  }
  check_rows_in_buffers(flats, table, op);
  const int64_t num_blocks = block_table.size(0);
  if (num_blocks == 0) {
    finish_empty_group(counters, args);
    return;
  }
  for_each_block(num_blocks, [&](int64_t block) {
    BlockWork work[kMaxMembers];
    Step steps[kMaxMembers];
    for (int k = 0; k < args.members; ++k) {
      work[k] = decode_member_block(rows, pairs, block, args.members, k, &launch.flats);
      steps[k] = member_step(args, k);
    }
    for (int k = 0; k < args.members; ++k) {
      if (!member_writes(args, k, work[k])) continue;
      for (unsigned lane = 0; lane < kLanes; ++lane) update_lane(work[k], steps[k], Lane{lane, kLanes});
    }
    if (args.bump_mask != 0) {
      const unsigned int done_before = __atomic_fetch_add(args.blocks_done, 1u, __ATOMIC_ACQ_REL);
      finish_group_block(args, steps, done_before, static_cast<unsigned int>(num_blocks));
    }
  });
}
}  // namespace
}  // namespace wavg_fused::blocks

TORCH_LIBRARY_IMPL(wavg_fused, CPU, m) {
  m.impl("update_emulated_", &wavg_fused::blocks::update_emulated);
  m.impl("update_group_emulated_", &wavg_fused::blocks::update_group_emulated);
}
