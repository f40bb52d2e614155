// The `cuda` backend's group update: several averages of one model (AveragerGroup) in one launch
// over the model's block table. Each block decodes every member's row of its tensor once, then
// runs its range for each member in turn (update_blocks.h): the model's bytes are read from memory
// by the first member and from L1/L2 by the others. The last block bumps the members' counters.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../wavg_rule.h"
#include "group_launch.h"
#include "update_blocks.h"

namespace wavg_fused {
namespace {

using blocks::BlockWork;
using blocks::FlatBases;
using blocks::GroupArgs;
using blocks::kMaxMembers;
using blocks::kThreads;
using blocks::Lane;

__global__ void __launch_bounds__(kThreads)
    update_group_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ block_table,
                        const __grid_constant__ FlatBases flats, const __grid_constant__ GroupArgs args) {
  __shared__ BlockWork shared_work[kMaxMembers];
  __shared__ Step shared_steps[kMaxMembers];
  if (threadIdx.x < args.members) {  // one thread per member: its row and its step
    const int k = static_cast<int>(threadIdx.x);
    shared_work[k] = blocks::decode_member_block(table, block_table, blockIdx.x, args.members, k, &flats);
    shared_steps[k] = blocks::member_step(args, k);
  }
  __syncthreads();
  const Lane lane{threadIdx.x, blockDim.x};
  for (int k = 0; k < args.members; ++k) {
    const BlockWork work = shared_work[k];
    if (blocks::member_writes(args, k, work)) blocks::update_lane(work, shared_steps[k], lane);
  }
  if (args.bump_mask != 0) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();  // every member's counter was read before this block counts as done
      blocks::finish_group_block(args, shared_steps, atomicAdd(args.blocks_done, 1u), gridDim.x);
    }
  }
}

void update_group_cuda(at::TensorList flats, const at::Tensor& table, const at::Tensor& block_table,
                       at::TensorList counters, const at::Tensor& workspace, at::IntArrayRef methods,
                       at::ArrayRef<double> params, at::IntArrayRef flags, at::IntArrayRef rounding_seeds) {
  const blocks::GroupLaunch launch = blocks::group_launch(c10::DeviceType::CUDA, "wavg_fused.update_group_", flats,
                                                          table, block_table, counters, workspace, methods, params,
                                                          flags, rounding_seeds);
  const c10::cuda::CUDAGuard device_guard(table.device());
  const int64_t num_blocks = block_table.size(0);
  if (num_blocks == 0) {
    blocks::finish_empty_group(counters, launch.args);
    return;
  }
  update_group_kernel<<<static_cast<unsigned int>(num_blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      table.data_ptr<int64_t>(), block_table.data_ptr<int64_t>(), launch.flats, launch.args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_fused, CUDA, m) { m.impl("update_group_", &update_group_cuda); }

}  // namespace wavg_fused
