// How many threads a CPU update runs on, from the bytes it moves: the one place that decides
// for every parallel loop of the `cpu` backend (update_cpu.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "kernel_api.h"

namespace wavg_fused::cpu {

// Bytes a thread moves at least. Below twice this the update runs on the calling thread alone:
// waking a sleeping OpenMP worker costs 50-100 us, about what 1 MB takes one core from cache
// (measured on 2 cores, benchmarks/small_tensors_cpu.py: 2 threads won from 1-1.5 MB of an fp32
// plan hot, from 1.5-3 MB after 2 ms idle). 512 KB is 43K fp32 elements read twice, written once:
// close to the 32K-element grain this replaced, but in bytes, so 16- and 64-bit plans split alike.
constexpr int64_t kMinBytesPerThread = 512 << 10;

// Bytes element [0, numel) of a plan row moves: the model read, the shadow read and written (a
// non-finite check reads the model only).
inline int64_t row_bytes(const int64_t* row, bool model_only) {
  return row[kNumel] * (model_only ? model_itemsize(row) : model_itemsize(row) + 2 * row[kItemsize]);
}

inline int64_t threads_for(int64_t bytes) {
  return std::clamp<int64_t>(bytes / kMinBytesPerThread, 1, at::get_num_threads());
}

// fn(begin, end) over [0, num_elems) in threads_for(bytes) equal ranges; on the calling thread
// alone, without entering a parallel region, when that is one.
template <typename Fn>
void parallel_elements(int64_t num_elems, int64_t bytes, const Fn& fn) {
  if (num_elems <= 0) return;
  const int64_t threads = threads_for(bytes);
  if (threads <= 1) return fn(int64_t{0}, num_elems);
  at::parallel_for(0, num_elems, (num_elems + threads - 1) / threads, fn);
}

}  // namespace wavg_fused::cpu
