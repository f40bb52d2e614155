// The Python module `wavg_fused._C`: importing it loads this library (which registers the ops)
// and offers one host helper that is too slow in Python.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/Exceptions.h>

namespace {

// first_moved(tables, keys, expected) -> int
// For each i, looks up tables[i][keys[i]] (a module's _parameters or _buffers dict) and returns
// the first i whose entry is missing or not at expected[i] (an int64 CPU tensor): a tensor's data
// address, or for any other object (a submodule) its id(); -1 if none moved. Update calls it every step to know its plan is still valid: about
// 10 ns per tensor here against about 100 ns for the same walk in Python.
PyObject* first_moved(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tables = nullptr, *keys = nullptr, *expected_obj = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!O", &PyList_Type, &tables, &PyList_Type, &keys, &expected_obj)) return nullptr;
  TORCH_CHECK(THPVariable_Check(expected_obj), "first_moved: expected must be a tensor");
  const at::Tensor& expected = THPVariable_Unpack(expected_obj);
  const Py_ssize_t count = PyList_GET_SIZE(tables);
  TORCH_CHECK(PyList_GET_SIZE(keys) == count && expected.numel() == count && expected.is_cpu() &&
                  expected.scalar_type() == at::kLong && expected.is_contiguous(),
              "first_moved: tables, keys and expected must have one entry per tensor");
  const int64_t* want = expected.data_ptr<int64_t>();
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* value = PyDict_GetItemWithError(PyList_GET_ITEM(tables, i), PyList_GET_ITEM(keys, i));
    if (value == nullptr && PyErr_Occurred()) return nullptr;
    if (value == nullptr) return PyLong_FromSsize_t(i);
    // a tensor is where its data is; anything else (a submodule) is itself: its id()
    const int64_t now = THPVariable_Check(value) ? reinterpret_cast<int64_t>(THPVariable_Unpack(value).data_ptr())
                                                 : reinterpret_cast<int64_t>(value);
    if (now != want[i]) return PyLong_FromSsize_t(i);
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"first_moved", first_moved, METH_VARARGS, "Index of the first tensor not at its expected address, or -1."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
