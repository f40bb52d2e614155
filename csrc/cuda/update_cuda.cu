// The `cuda` backend: one launch updates every tensor of the plan. Each CUDA block takes one row of
// the block table (tensor index, start element) and processes up to kBlockElems elements of that
// tensor, so the dtype branch is uniform per block. Tables live in device memory (uploaded when the
// plan is built), never in kernel arguments. The block that finishes last bumps n_averaged, so the
// launch needs no host sync and can be captured in a CUDA graph.
//
// The per-block work is in update_blocks.h, shared with the CPU emulation of this grid
// (update_emulated.cpp, the `cuda-emulated` test backend); this file keeps only the __global__
// wrappers (what is per block, once; synchronisation; the atomics) and the host function.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../method_params.h"
#include "../wavg_rule.h"
#include "update_args.h"
#include "update_blocks.h"

namespace wavg_fused {
namespace {

using blocks::BlockStart;
using blocks::BlockWork;
using blocks::FlatBases;
using blocks::kThreads;
using blocks::Lane;
using blocks::UpdateArgs;

__device__ __forceinline__ Lane this_lane() { return Lane{threadIdx.x, blockDim.x}; }

__global__ void __launch_bounds__(kThreads)
    update_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ block_table,
                  const __grid_constant__ FlatBases flats,  // indexed in place, not copied to local memory
                  const UpdateArgs args) {
  // what is the same for every thread of the block, computed once (Step::make: tanh, exp, log)
  __shared__ BlockWork shared_work;
  __shared__ BlockStart shared_start;
  if (threadIdx.x == 0) {
    shared_work = blocks::decode_block(table, block_table, blockIdx.x, &flats);
    shared_start = blocks::start_update_block(args);
  }
  __syncthreads();
  const BlockWork work = shared_work;
  const BlockStart start = shared_start;
  if (!start.skip) blocks::update_lane(work, start.step, this_lane());  // skipped: no shadow is written
  if (blocks::counts_blocks(args)) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();  // this block's reads of n_averaged and the flag happened before it counts as done
      blocks::finish_update_block(args, start, atomicAdd(args.blocks_done, 1u), gridDim.x);
    }
  }
}

// kModeCheck: set *nonfinite if an averaged model value is Inf or NaN. A separate pass, because
// the decision must be known before any block writes a shadow; it reads the model only.
__global__ void __launch_bounds__(kThreads)
    check_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ block_table, int* nonfinite) {
  const BlockWork work = blocks::decode_block(table, block_table, blockIdx.x, nullptr);
  if (blocks::check_lane(work, this_lane())) *nonfinite = 1;  // every writer stores the same value: no atomic
}

// Modes that write the model (copy_to, swap), kept out of update_kernel: in one kernel the extra
// branches pushed the sm_80 build into register spills. Same block table, one launch.
__global__ void __launch_bounds__(kThreads)
    transfer_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ block_table,
                    const __grid_constant__ FlatBases flats, int64_t mode) {
  __shared__ BlockWork shared_work;
  if (threadIdx.x == 0) shared_work = blocks::decode_block(table, block_table, blockIdx.x, &flats);
  __syncthreads();
  const BlockWork work = shared_work;
  blocks::transfer_lane(work, mode, this_lane());
}

void update_cuda(at::TensorList flats, const at::Tensor& table, const at::Tensor& block_table,
                 const at::Tensor& n_averaged, const at::Tensor& workspace, int64_t method,
                 at::ArrayRef<double> params, bool bump, int64_t rounding_seed, int64_t mode, bool guard,
                 const std::optional<at::Tensor>& n_skipped) {
  const FlatBases flat_bases = blocks::check_launch(c10::DeviceType::CUDA, flats, table, block_table, n_averaged,
                                                    workspace, params, bump, mode, guard, n_skipped);
  const c10::cuda::CUDAGuard device_guard(table.device());
  const int64_t num_blocks = block_table.size(0);
  if (num_blocks == 0) {  // a plan of empty tensors: nothing to launch but the counts
    blocks::finish_empty_launch(n_averaged, workspace, bump, mode, guard, n_skipped);
    return;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto grid = static_cast<unsigned int>(num_blocks);
  if (mode == kModeCheck) {
    check_kernel<<<grid, kThreads, 0, stream>>>(table.data_ptr<int64_t>(), block_table.data_ptr<int64_t>(),
                                                workspace.data_ptr<int32_t>() + kNonfiniteSlot);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (mode != kModeAverage) {
    transfer_kernel<<<grid, kThreads, 0, stream>>>(table.data_ptr<int64_t>(), block_table.data_ptr<int64_t>(),
                                                   flat_bases, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const UpdateArgs args = blocks::update_args(n_averaged, workspace, method, params, bump, rounding_seed, guard,
                                              n_skipped);
  update_kernel<<<grid, kThreads, 0, stream>>>(table.data_ptr<int64_t>(), block_table.data_ptr<int64_t>(),
                                               flat_bases, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_fused, CUDA, m) { m.impl("update_", &update_cuda); }

}  // namespace wavg_fused
