// The address watch's compiled walk (csrc/address_watch.cpp), offered by the `_C` module.
#pragma once
#include <Python.h>

#include <cstdint>
#include <vector>

namespace wavg_fused {

// watch_record(tables: list[dict], keys: list[, grad_slots: int]) -> capsule: every slot's entry as it is
// now; requires_grad is part of the check for the first grad_slots slots (default: all)
PyObject* watch_record(PyObject* self, PyObject* args);
// watch_first_moved(capsule) -> int: the first slot whose entry moved, changed view, or is gone; -1 if none
PyObject* watch_first_moved(PyObject* self, PyObject* capsule);

// The same check in pieces, for a caller that runs the plain slots' part inside its own parallel
// region (cpu/update_if_unmoved.cpp). watch_begin reads the dicts' versions (GIL held; false with
// a Python error set if `capsule` is no record); watch_first_plain_moved checks the plain tensor
// slots of [begin, end) and may run on any thread while the caller holds the GIL;
// watch_first_python_moved checks the slots that need Python below `below` (GIL held). Both give
// the first moved slot, -1 if none; the last gives -2 with a Python error set.
constexpr int64_t kWatchSlotsPerThread = 1024;  // fewer slots are checked on fewer threads

struct WatchPass {
  const void* record = nullptr;
  int64_t slot_count = 0;
  std::vector<char> mutated;  // per watched dict
};
bool watch_begin(PyObject* capsule, WatchPass& pass);
int64_t watch_first_plain_moved(const WatchPass& pass, int64_t begin, int64_t end);
int64_t watch_first_python_moved(const WatchPass& pass, int64_t below);

}  // namespace wavg_fused
