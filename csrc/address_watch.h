// The address watch's compiled walk (csrc/address_watch.cpp), offered by the `_C` module.
#pragma once
#include <Python.h>

namespace wavg_fused {

// watch_record(tables: list[dict], keys: list[, grad_slots: int]) -> capsule: every slot's entry as it is
// now; requires_grad is part of the check for the first grad_slots slots (default: all)
PyObject* watch_record(PyObject* self, PyObject* args);
// watch_first_moved(capsule) -> int: the first slot whose entry moved, changed view, or is gone; -1 if none
PyObject* watch_first_moved(PyObject* self, PyObject* capsule);

}  // namespace wavg_fused
