// What the per-instruction-set element kernels (kernel.h, compiled once per ISA) share with the
// host function (update_cpu.cpp), which picks one at run time.
#pragma once

#include <cstdint>

namespace wavg_fused::cpu {

struct Weights {
  double w;
  bool from_shadow;
  int64_t rounding_seed;  // < 0: round to nearest; else stochastic rounding of bf16 shadows
  int64_t n_averaged;
  template <typename T>
  T weight() const { return static_cast<T>(w); }
  template <typename T>
  T one_minus() const { return static_cast<T>(1.0 - w); }
};

// One update's view of the plan: tensor table rows, the first element of each tensor in the
// whole plan (num_tensors + 1 entries), and the storage buffers' base addresses.
struct PlanView {
  const int64_t* rows;
  const int64_t* first;
  int64_t num_tensors;
  char* const* flat_bases;
  Weights weights;
};

// Update elements [begin, end) of the whole plan (they may span several tensors).
using ProcessFn = void (*)(const PlanView&, int64_t begin, int64_t end);

namespace isa_default { void process_elements(const PlanView&, int64_t, int64_t); }
namespace isa_avx2 { void process_elements(const PlanView&, int64_t, int64_t); }
namespace isa_avx512 { void process_elements(const PlanView&, int64_t, int64_t); }

}  // namespace wavg_fused::cpu
