// What the per-instruction-set element kernels (kernel.h, compiled once per ISA) share with the
// host function (update_cpu.cpp), which picks one at run time.
#pragma once

#include <cstdint>

#include "../wavg_rule.h"

namespace wavg_fused::cpu {

// One update's view of the plan: tensor table rows, the first element of each tensor in the
// whole plan (num_tensors + 1 entries), and the storage buffers' base addresses. A group's table
// holds `members` rows per model tensor (row t * members + k: member k's shadow of tensor t, no
// elements where member k does not keep it), each with its own step; `active` says which members
// this update writes. A single average is a group of one (`steps`, `active` then unused).
struct PlanView {
  const int64_t* rows;
  const int64_t* first;
  int64_t num_tensors;
  char* const* flat_bases;
  Step weights;
  int64_t mode;  // wavg_rule.h Mode
  int64_t members = 1;
  const Step* steps = nullptr;
  const bool* active = nullptr;
};

// Bytes of one model element of a plan row (kItemsize is the shadow's; integer rows have equal dtypes).
inline int64_t model_itemsize(const int64_t* row) {
  switch (row[kModelDtype]) {
    case kFloat32: return 4;
    case kFloat64: return 8;
    case kFloat16: case kBFloat16: return 2;
    default: return row[kItemsize];
  }
}

// Update elements [begin, end) of the whole plan (they may span several tensors).
using ProcessFn = void (*)(const PlanView&, int64_t begin, int64_t end);
// Whether any averaged (role kAverage) model element in [begin, end) of the plan is Inf or NaN.
using CheckFn = bool (*)(const PlanView&, int64_t begin, int64_t end);

struct Kernels {
  ProcessFn process;
  CheckFn any_nonfinite;
  const char* isa;  // "default", "avx2" or "avx512": what backend_report() shows
};

// The kernels the `cpu` backend runs (update_cpu.cpp): the widest this CPU supports, or the one
// WAVG_FUSED_CPU_ISA forces (throws c10::Error for an unknown name).
const Kernels& selected_kernels();

namespace isa_default { void process_elements(const PlanView&, int64_t, int64_t); bool any_nonfinite(const PlanView&, int64_t, int64_t); }
namespace isa_avx2 { void process_elements(const PlanView&, int64_t, int64_t); bool any_nonfinite(const PlanView&, int64_t, int64_t); }
namespace isa_avx512 { void process_elements(const PlanView&, int64_t, int64_t); bool any_nonfinite(const PlanView&, int64_t, int64_t); }

}  // namespace wavg_fused::cpu
