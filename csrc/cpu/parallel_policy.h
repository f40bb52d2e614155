// How many threads a CPU update runs on, from the bytes it moves: the one place that decides
// for every parallel loop of the `cpu` backend (update_cpu.cpp, update_if_unmoved.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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

// Bytes a claimed chunk moves. The threads take chunks from a shared counter rather than one
// fixed range each: an OpenMP worker asleep after serial work (an optimizer step over many small
// tensors) joins 100-200 us late on a virtual machine, and with fixed ranges the whole update
// then waits for its range; with chunks the threads already running do its share meanwhile.
constexpr int64_t kChunkBytes = 256 << 10;
constexpr int64_t kChunkAlignElems = 64;  // a chunk boundary inside a tensor keeps vector lines whole

// Elements of a chunk of a pass of `num_elems` elements that moves `bytes`.
inline int64_t elements_per_chunk(int64_t num_elems, int64_t bytes) {
  const int64_t elems = num_elems * kChunkBytes / std::max<int64_t>(bytes, 1);
  return std::max<int64_t>((elems + kChunkAlignElems - 1) / kChunkAlignElems, 1) * kChunkAlignElems;
}

// fn(begin, end) over [0, num_elems), in chunks claimed by up to threads_for(bytes) threads; on
// the calling thread alone, without entering a parallel region, when that is one.
template <typename Fn>
void parallel_elements(int64_t num_elems, int64_t bytes, const Fn& fn) {
  if (num_elems <= 0) return;
  const int64_t threads = threads_for(bytes);
  if (threads <= 1) return fn(int64_t{0}, num_elems);
  const int64_t per_chunk = elements_per_chunk(num_elems, bytes);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin = next.fetch_add(per_chunk); begin < num_elems; begin = next.fetch_add(per_chunk)) {
      fn(begin, std::min(begin + per_chunk, num_elems));
    }
  });
}

}  // namespace wavg_fused::cpu
