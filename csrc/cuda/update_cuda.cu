// The `cuda` backend: one launch updates every tensor of the plan. Each CUDA block takes one row of
// the block table (tensor index, start element) and processes up to kBlockElems elements of that
// tensor, so the dtype branch is uniform per block. Tables live in device memory (uploaded when the
// plan is built), never in kernel arguments. The block that finishes last bumps n_averaged, so the
// launch needs no host sync and can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>

#include "../method_params.h"
#include "../wavg_rule.h"

namespace wavg_fused {
namespace {

constexpr int kThreads = 256;
// Elements per CUDA block; must match the Python side (backends/fused.py CudaBackend.block_elems).
constexpr int64_t kBlockElems = 4096;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename S>
using opmath_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

struct FlatBases {
  char* ptr[kMaxFlats];
};

template <typename S, typename M>
__device__ __forceinline__ S next_value(S s, M m, bool copy, const Step& k, int64_t element) {
  using Op = opmath_t<S>;
  if (copy) {
    // equal dtypes: the bits as they are (NaN payloads too), so swap's backup restores exactly
    if constexpr (std::is_same_v<S, M>) return m;
    else return static_cast<S>(static_cast<Op>(m));
  }
  const Op value = averaged<Op>(static_cast<Op>(s), static_cast<Op>(m), k.weight<Op>(), k.one_minus<Op>(),
                                k.from_shadow);
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    if (k.rounding_seed >= 0) {
      const Random4 random = rounding_bits(k.rounding_seed, k.n_averaged, element >> 2);
      return c10::BFloat16(stochastic_round_bf16(value, random.v[element & 3]), c10::BFloat16::from_bits());
    }
  }
  return static_cast<S>(value);
}

// Elements [begin, end) of one tensor; `first` is the shadow's offset in its storage buffer
// (the element index that keys stochastic rounding).
template <typename S, typename M>
__device__ void update_range(S* shadow, const M* model, int64_t begin, int64_t end, bool aligned, bool copy,
                             const Step& k, int64_t first) {
  constexpr int N = 16 / (sizeof(S) > sizeof(M) ? sizeof(S) : sizeof(M));
  int64_t tail = begin;
  if (aligned) {  // the host checked 16-byte alignment of both bases; begin is a multiple of N
    const int64_t vectors = (end - begin) / N;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const int64_t i = begin + v * N;
      auto s = *reinterpret_cast<const Pack<S, N>*>(shadow + i);
      const auto m = *reinterpret_cast<const Pack<M, N>*>(model + i);
#pragma unroll
      for (int j = 0; j < N; ++j) s.v[j] = next_value(s.v[j], m.v[j], copy, k, first + i + j);
      *reinterpret_cast<Pack<S, N>*>(shadow + i) = s;
    }
    tail = begin + vectors * N;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    shadow[i] = next_value(shadow[i], model[i], copy, k, first + i);
  }
}

// Integer, bool and other non-floating tensors: a byte copy, 16 bytes at a time where aligned.
__device__ void copy_bytes(char* shadow, const char* model, int64_t begin, int64_t end, bool aligned) {
  int64_t tail = begin;
  if (aligned && begin % 16 == 0) {
    const int64_t vectors = (end - begin) / 16;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      reinterpret_cast<uint4*>(shadow + begin)[v] = reinterpret_cast<const uint4*>(model + begin)[v];
    }
    tail = begin + vectors * 16;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) shadow[i] = model[i];
}

// kModeSwap: exchange bytes [begin, end) of two tensors of one dtype, 16 bytes at a time where aligned.
__device__ void swap_bytes(char* a, char* b, int64_t begin, int64_t end, bool aligned) {
  int64_t tail = begin;
  if (aligned && begin % 16 == 0) {
    const int64_t vectors = (end - begin) / 16;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const uint4 x = reinterpret_cast<const uint4*>(a + begin)[v];
      reinterpret_cast<uint4*>(a + begin)[v] = reinterpret_cast<const uint4*>(b + begin)[v];
      reinterpret_cast<uint4*>(b + begin)[v] = x;
    }
    tail = begin + vectors * 16;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) {
    const char x = a[i];
    a[i] = b[i];
    b[i] = x;
  }
}

// kModeCopyToModel across dtypes (an fp32 average into a bf16 model): one element per thread.
template <typename S, typename M>
__device__ void cast_range(M* model, const S* shadow, int64_t begin, int64_t end) {
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    model[i] = static_cast<M>(static_cast<opmath_t<S>>(shadow[i]));
  }
}

template <typename Fn>
__device__ void with_float_type(int64_t code, Fn&& fn) {
  switch (code) {
    case kFloat32: fn(float{}); break;
    case kFloat64: fn(double{}); break;
    case kFloat16: fn(c10::Half{}); break;
    case kBFloat16: fn(c10::BFloat16{}); break;
    default: break;  // the host only sends floating codes here
  }
}

__global__ void __launch_bounds__(kThreads)
    update_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ blocks,
                  const __grid_constant__ FlatBases flats,  // indexed in place, not copied to local memory
                  int64_t* n_averaged, unsigned int* blocks_done, int64_t method, MethodParams params, bool bump,
                  int64_t rounding_seed, int* nonfinite, int64_t* n_skipped) {
  const int64_t* row = table + blocks[2 * static_cast<int64_t>(blockIdx.x)] * kNumColumns;
  const int64_t begin = blocks[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t end = min(begin + kBlockElems, row[kNumel]);
  const int64_t n = *n_averaged;  // every block reads it before the last one bumps it
  const Step k = Step::make(method, params, n, rounding_seed);
  const bool aligned = (row[kFlags] & kFlagAligned) != 0;
  const bool copy = row[kRole] != kAverage;
  const int64_t model_code = row[kModelDtype], shadow_code = row[kShadowDtype];
  char* shadow_base = flats.ptr[row[kFlat]] + row[kShadowOffset] * row[kItemsize];
  // Guarded: check_kernel ran before on this stream; its flag is the same for every block.
  const bool skip = nonfinite != nullptr && *nonfinite != 0;

  if (skip) {
    // the whole update is skipped: no shadow is written
  } else if (model_code <= kBFloat16 && shadow_code <= kBFloat16) {
    with_float_type(shadow_code, [&](auto shadow_tag) {
      using S = decltype(shadow_tag);
      with_float_type(model_code, [&](auto model_tag) {
        using M = decltype(model_tag);
        update_range(reinterpret_cast<S*>(shadow_base), reinterpret_cast<const M*>(row[kModelPtr]), begin, end,
                     aligned, copy, k, row[kShadowOffset]);
      });
    });
  } else {
    const int64_t size = row[kItemsize];
    copy_bytes(shadow_base, reinterpret_cast<const char*>(row[kModelPtr]),
               begin * size, end * size, aligned);
  }

  if (bump || nonfinite != nullptr) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();  // this block's reads of n_averaged and the flag happened before it counts as done
      if (atomicAdd(blocks_done, 1u) == gridDim.x - 1) {
        if (skip) {
          if (n_skipped != nullptr) *n_skipped += 1;
          *nonfinite = 0;
        } else if (bump) {
          *n_averaged = n + 1;
        }
        *blocks_done = 0;  // ready for the next launch (and for graph replays)
      }
    }
  }
}

// Any Inf or NaN among the elements [begin, end) of one tensor, read as raw bits.
template <typename Bits>
__device__ bool range_nonfinite(const Bits* values, int64_t begin, int64_t end, bool aligned, Bits exponent) {
  constexpr int N = 16 / sizeof(Bits);
  bool found = false;
  int64_t tail = begin;
  if (aligned) {  // as in update_range: 16-byte aligned base, begin a multiple of N
    const int64_t vectors = (end - begin) / N;
    for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
      const auto pack = *reinterpret_cast<const Pack<Bits, N>*>(values + begin + v * N);
#pragma unroll
      for (int j = 0; j < N; ++j) found |= nonfinite_bits(pack.v[j], exponent);
    }
    tail = begin + vectors * N;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += blockDim.x) found |= nonfinite_bits(values[i], exponent);
  return found;
}

// kModeCheck: set *nonfinite if an averaged model value is Inf or NaN. A separate pass, because
// the decision must be known before any block writes a shadow; it reads the model only.
__global__ void __launch_bounds__(kThreads)
    check_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ blocks, int* nonfinite) {
  const int64_t* row = table + blocks[2 * static_cast<int64_t>(blockIdx.x)] * kNumColumns;
  if (row[kRole] != kAverage) return;
  const int64_t begin = blocks[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t end = min(begin + kBlockElems, row[kNumel]);
  const bool aligned = (row[kFlags] & kFlagAligned) != 0;
  const auto* model = reinterpret_cast<const char*>(row[kModelPtr]);
  bool found = false;
  switch (row[kModelDtype]) {
    case kFloat32: found = range_nonfinite(reinterpret_cast<const uint32_t*>(model), begin, end, aligned, kExponentF32); break;
    case kFloat64: found = range_nonfinite(reinterpret_cast<const uint64_t*>(model), begin, end, aligned, kExponentF64); break;
    case kFloat16: found = range_nonfinite(reinterpret_cast<const uint16_t*>(model), begin, end, aligned, kExponentF16); break;
    case kBFloat16: found = range_nonfinite(reinterpret_cast<const uint16_t*>(model), begin, end, aligned, kExponentBF16); break;
    default: break;
  }
  if (found) *nonfinite = 1;  // every writer stores the same value: no atomic needed
}

// Modes that write the model (copy_to, swap), kept out of update_kernel: in one kernel the extra
// branches pushed the sm_80 build into register spills. Same block table, one launch.
__global__ void __launch_bounds__(kThreads)
    transfer_kernel(const int64_t* __restrict__ table, const int64_t* __restrict__ blocks,
                    const __grid_constant__ FlatBases flats, int64_t mode) {
  const int64_t* row = table + blocks[2 * static_cast<int64_t>(blockIdx.x)] * kNumColumns;
  const int64_t begin = blocks[2 * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t end = min(begin + kBlockElems, row[kNumel]);
  const bool aligned = (row[kFlags] & kFlagAligned) != 0;
  const int64_t model_code = row[kModelDtype], shadow_code = row[kShadowDtype];
  char* shadow_base = flats.ptr[row[kFlat]] + row[kShadowOffset] * row[kItemsize];
  char* model_base = reinterpret_cast<char*>(row[kModelPtr]);
  const int64_t size = row[kItemsize];
  if (mode == kModeSwap) {  // the host checked the dtypes are equal
    swap_bytes(shadow_base, model_base, begin * size, end * size, aligned);
  } else if (model_code == shadow_code) {
    copy_bytes(model_base, shadow_base, begin * size, end * size, aligned);
  } else {
    with_float_type(shadow_code, [&](auto shadow_tag) {
      using S = decltype(shadow_tag);
      with_float_type(model_code, [&](auto model_tag) {
        using M = decltype(model_tag);
        cast_range(reinterpret_cast<M*>(model_base), reinterpret_cast<const S*>(shadow_base), begin, end);
      });
    });
  }
}

void update_cuda(at::TensorList flats, const at::Tensor& table, const at::Tensor& blocks,
                 const at::Tensor& n_averaged, const at::Tensor& workspace, int64_t method,
                 at::ArrayRef<double> params, bool bump, int64_t rounding_seed, int64_t mode, bool guard,
                 const std::optional<at::Tensor>& n_skipped) {
  TORCH_CHECK(mode >= kModeAverage && mode <= kModeCheck, "wavg_fused.update_: unknown mode ", mode);
  TORCH_CHECK(mode == kModeAverage || !bump, "wavg_fused.update_: only mode 0 (average) bumps n_averaged");
  TORCH_CHECK(table.is_cuda() && table.scalar_type() == at::kLong && table.is_contiguous() && table.dim() == 2 &&
                  table.size(1) == kNumColumns,
              "wavg_fused.update_: table must be a contiguous CUDA int64 tensor [T, ", kNumColumns, "]");
  TORCH_CHECK(blocks.is_cuda() && blocks.scalar_type() == at::kLong && blocks.is_contiguous() && blocks.dim() == 2 &&
                  blocks.size(1) == 2,
              "wavg_fused.update_: blocks must be a contiguous CUDA int64 tensor [B, 2]");
  TORCH_CHECK(workspace.is_cuda() && workspace.scalar_type() == at::kInt && workspace.is_contiguous() &&
                  workspace.numel() >= ((guard || mode == kModeCheck) ? kWorkspaceSlots : 1),
              "wavg_fused.update_: workspace must be a contiguous CUDA int32 tensor of ", kWorkspaceSlots,
              " elements (1 without the non-finite guard)");
  TORCH_CHECK(!n_skipped.has_value() ||
                  (n_skipped->is_cuda() && n_skipped->scalar_type() == at::kLong && n_skipped->numel() == 1 &&
                   n_skipped->get_device() == table.get_device()),
              "wavg_fused.update_: n_skipped must be a one-element int64 tensor on the table's device");
  TORCH_CHECK(n_averaged.is_cuda() && n_averaged.scalar_type() == at::kLong && n_averaged.numel() == 1,
              "wavg_fused.update_: n_averaged must be a one-element CUDA int64 tensor");
  TORCH_CHECK(blocks.get_device() == table.get_device() && n_averaged.get_device() == table.get_device() &&
                  workspace.get_device() == table.get_device(),
              "wavg_fused.update_: table, blocks, n_averaged and workspace must be on one device");
  TORCH_CHECK(flats.size() <= kMaxFlats, "wavg_fused.update_: at most ", kMaxFlats, " storage buffers, got ",
              flats.size());
  FlatBases flat_bases{};
  for (size_t f = 0; f < flats.size(); ++f) {
    TORCH_CHECK(flats[f].is_cuda() && flats[f].get_device() == table.get_device() && flats[f].is_contiguous(),
                "wavg_fused.update_: storage buffers must be contiguous and on the table's device");
    flat_bases.ptr[f] = static_cast<char*>(flats[f].data_ptr());
  }
  const c10::cuda::CUDAGuard device_guard(table.device());
  const int64_t num_blocks = blocks.size(0);
  if (num_blocks == 0) {  // a plan of empty tensors: nothing to launch but the counts
    if (mode != kModeAverage) return;
    if (!guard) {
      if (bump) n_averaged.add_(1);
      return;
    }
    // the flag can be set here only by a caller combining devices' flags: decide on the device
    const at::Tensor flag = workspace.narrow(0, kNonfiniteSlot, 1).squeeze(0).to(at::kLong);
    if (bump) n_averaged.sub_(flag).add_(1);
    if (n_skipped.has_value()) n_skipped->add_(flag);
    workspace.narrow(0, kNonfiniteSlot, 1).zero_();
    return;
  }
  TORCH_CHECK(num_blocks < (int64_t{1} << 31), "wavg_fused.update_: too many blocks: ", num_blocks);
  // workspace[0] counts finished blocks; it is zero between launches (the last block resets it).
  auto* blocks_done = reinterpret_cast<unsigned int*>(workspace.data_ptr<int32_t>() + kBlocksDoneSlot);
  int* nonfinite = workspace.data_ptr<int32_t>() + kNonfiniteSlot;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (mode == kModeCheck) {
    check_kernel<<<static_cast<unsigned int>(num_blocks), kThreads, 0, stream>>>(
        table.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), nonfinite);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (mode != kModeAverage) {
    transfer_kernel<<<static_cast<unsigned int>(num_blocks), kThreads, 0, stream>>>(
        table.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), flat_bases, mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  update_kernel<<<static_cast<unsigned int>(num_blocks), kThreads, 0, stream>>>(
      table.data_ptr<int64_t>(), blocks.data_ptr<int64_t>(), flat_bases, n_averaged.data_ptr<int64_t>(), blocks_done,
      method, method_params(params), bump, rounding_seed, guard ? nonfinite : nullptr,
      n_skipped.has_value() ? n_skipped->data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(wavg_fused, CUDA, m) { m.impl("update_", &update_cuda); }

}  // namespace wavg_fused
