// The op schemas, defined once; each device file registers its implementation.
#include <torch/library.h>

TORCH_LIBRARY(wavg_fused, m) {
  // One update of a whole plan: every tensor of `table` (rows as in wavg_fused/plan.py COLUMNS)
  // averaged or copied into the shadow storage `flats`, w_n computed on the device from
  // `n_averaged`, which is bumped when `bump`. Model tensors are read at the addresses in the
  // table: the caller keeps them alive and rebuilds the table when one moves (passing them as a
  // list would cost ~0.1-0.3 us per tensor in argument conversion alone).
  // `params` are the method's hyperparameters (at most 4, wavg_rule.h MethodParams).
  // `action` (wavg_rule.h Mode) 1 and 2 WRITE the model tensors at the table's addresses (copy the
  // average into the model, or exchange the two): a write the schema cannot annotate, since the
  // model tensors are not arguments. The caller owns that aliasing (wavg_fused/swap.py: it keeps
  // the written memory alive while swapped in and bumps the written tensors' version counters).
  // `action` 3 only reads: it sets workspace[1] if an averaged model value is Inf or NaN. With
  // `guard`, the update (action 0) reads that flag on the device: set, it leaves every shadow as it
  // is, bumps `n_skipped` (when given) instead of n_averaged, and clears the flag.
  // `blocks` is the per-block work list ([B, 2]: tensor index, start element); `workspace` is
  // a zeroed int32 scratch (wavg_rule.h kWorkspaceSlots): the CUDA kernel's finished-block count and
  // the non-finite flag. A non-negative
  // `rounding_seed` rounds bf16 shadows stochastically.
  m.def(
      "update_(Tensor(a!)[] flats, Tensor table, Tensor blocks, Tensor(b!) n_averaged, "
      "Tensor(c!) workspace, int method, float[] params, bool bump, int rounding_seed, int action=0, "
      "bool guard=False, Tensor(d!)? n_skipped=None) -> ()");
  // The same update run by the CUDA kernels' code on the CPU (csrc/cuda/update_emulated.cpp): the
  // `cuda-emulated` test backend, with the cuda backend's tables (`blocks` of 4096 elements) on
  // the CPU. CPU tensors only.
  m.def(
      "update_emulated_(Tensor(a!)[] flats, Tensor table, Tensor blocks, Tensor(b!) n_averaged, "
      "Tensor(c!) workspace, int method, float[] params, bool bump, int rounding_seed, int action=0, "
      "bool guard=False, Tensor(d!)? n_skipped=None) -> ()");
  // Several averages of one model (AveragerGroup) in one pass: `table` has one row per (model
  // tensor, member), member k's row of tensor t at t * K + k (K = len(methods); a row without
  // elements where member k does not keep tensor t), its `flat` indexing the concatenation of
  // every member's storage buffers; `blocks` addresses tensors (as update_'s, over each tensor's
  // elements). Per member k: `counters[k]` (its n_averaged, read on the device), `methods[k]`,
  // `params[4k:4k+4]`, `rounding_seeds[k]`, and `flags[k]` (1: bump its counter, 2: write its
  // shadow in this update). The update only (no transfers, no guard); the model is read once.
  m.def(
      "update_group_(Tensor(a!)[] flats, Tensor table, Tensor blocks, Tensor(b!)[] counters, "
      "Tensor(c!) workspace, int[] methods, float[] params, int[] flags, int[] rounding_seeds) -> ()");
  m.def(
      "update_group_emulated_(Tensor(a!)[] flats, Tensor table, Tensor blocks, Tensor(b!)[] counters, "
      "Tensor(c!) workspace, int[] methods, float[] params, int[] flags, int[] rounding_seeds) -> ()");
}

// The op has no outputs and nothing to differentiate: skip autograd's boxed not-implemented
// fallback, which inspects every tensor of the lists (about 1 us per model tensor).
TORCH_LIBRARY_IMPL(wavg_fused, Autograd, m) {
  m.impl("update_", torch::CppFunction::makeFallthrough());
  m.impl("update_emulated_", torch::CppFunction::makeFallthrough());
  m.impl("update_group_", torch::CppFunction::makeFallthrough());
  m.impl("update_group_emulated_", torch::CppFunction::makeFallthrough());
}
