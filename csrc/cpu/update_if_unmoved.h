// The `cpu` backend's steady-state update (update_if_unmoved.cpp), offered by the `_C` module.
#pragma once
#include <Python.h>

namespace wavg_fused::cpu {

// cpu_bind_update(flats, table, n_averaged, method, params: list[float], rounding_seed) -> capsule:
// the arguments of `update_(..., bump=True, mode=average, guard=False)`, checked once and kept
PyObject* bind_update(PyObject* self, PyObject* args);
// cpu_update_if_unmoved(bound update, watch record) -> bool: True once it checked every watched
// slot and ran the update; False, with nothing written, if a slot moved
PyObject* update_if_unmoved(PyObject* self, PyObject* args);

}  // namespace wavg_fused::cpu
