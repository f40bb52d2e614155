// The Python module `wavg_fused._C`: importing it loads this library (which registers the ops)
// and offers host helpers that are too slow in Python, and what the CPU kernel picked.
#include <Python.h>
#include <torch/csrc/Exceptions.h>

#include "address_watch.h"
#include "cpu/kernel_api.h"
#include "cpu/update_if_unmoved.h"

namespace {

// cpu_kernel_isa() -> str: the instruction set of the CPU kernel that `update_` runs ("default",
// "avx2" or "avx512"), chosen at run time; RuntimeError if WAVG_FUSED_CPU_ISA names none of them.
PyObject* cpu_kernel_isa(PyObject* /*self*/, PyObject* /*args*/) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(wavg_fused::cpu::selected_kernels().isa);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"watch_record", wavg_fused::watch_record, METH_VARARGS, "Record the watched slots' entries as they are now."},
    {"watch_first_moved", wavg_fused::watch_first_moved, METH_O, "Index of the first watched slot that moved, or -1."},
    {"cpu_bind_update", wavg_fused::cpu::bind_update, METH_VARARGS, "The cpu backend's update with its arguments checked and kept."},
    {"cpu_update_if_unmoved", wavg_fused::cpu::update_if_unmoved, METH_VARARGS,
     "Check the watch record, then run the bound cpu update; False, with nothing written, if a slot moved."},
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS, "Instruction set of the CPU kernel update_ runs: default, avx2 or avx512."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
