// The Python module `wavg_fused._C`: importing it loads this library (which registers the ops)
// and offers host helpers that are too slow in Python, and what the CPU kernel picked.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/Exceptions.h>

#include <algorithm>
#include <vector>

#include "cpu/kernel_api.h"

namespace {

constexpr int64_t kNotATensor = -1;
// How far ahead the walk prefetches: the objects of slot i + kAhead, then the tensor behind slot
// i + kAhead / 2 (whose object has arrived by then). Each slot is a chain of dependent loads
// (dict, keys, object, TensorImpl, StorageImpl) in memory the kernel just evicted; fetching
// several chains at once hides most of the misses.
constexpr Py_ssize_t kAhead = 16;

void prefetch_slot_objects(PyObject* tables, PyObject* keys, PyObject* held, Py_ssize_t j, Py_ssize_t count) {
  if (j >= count) return;
  __builtin_prefetch(PyList_GET_ITEM(tables, j));
  __builtin_prefetch(PyList_GET_ITEM(keys, j));  // the key's cached hash
  __builtin_prefetch(PyList_GET_ITEM(held, j));
}

void prefetch_slot_tensor(PyObject* tables, PyObject* held, Py_ssize_t j, Py_ssize_t count) {
  if (j >= count) return;
  if (PyDict_Check(PyList_GET_ITEM(tables, j))) {  // a small dict's keys object: header, indices, entries
    const char* dict_keys = reinterpret_cast<const char*>(reinterpret_cast<PyDictObject*>(PyList_GET_ITEM(tables, j))->ma_keys);
    __builtin_prefetch(dict_keys);
    __builtin_prefetch(dict_keys + 64);
  }
  PyObject* value = PyList_GET_ITEM(held, j);
  if (!THPVariable_Check(value)) return;
  c10::TensorImpl* impl = THPVariable_Unpack(value).unsafeGetTensorImpl();
  __builtin_prefetch(impl);
  __builtin_prefetch(reinterpret_cast<const char*>(impl) + 64);
  __builtin_prefetch(reinterpret_cast<const char*>(impl) + 128);
  if (const c10::Storage& storage = impl->unsafe_storage()) __builtin_prefetch(storage.unsafeGetStorageImpl());
}
constexpr int64_t kDTensor = -2;

// first_moved(tables, keys, expected, layouts, held=None) -> int
// For each i, looks up tables[i][keys[i]] (a module's _parameters, _buffers or _modules dict) and
// returns the first i whose entry is missing or changed; -1 if none did. expected[i] (an int64 CPU
// tensor) is a tensor's data address or, for anything else (a submodule), its id(). `layouts`
// holds, per entry, [dtype code, ndim, sizes..., strides..., requires_grad] for a tensor or [-1] for anything
// else: `p.data = p.data.t()` keeps the address and must still count as a change. A DTensor
// (an object with a `_local_tensor`) is recorded as [-2, its local tensor's layout] and compared
// by that local tensor, where its bytes are (the DTensor's own data_ptr() is 0). Update calls it
// every step to know its plan is valid: about 10 ns a tensor here against ~100 ns in Python.
// `held` (optional) lists the values as they were recorded, which the caller keeps alive: only
// their addresses are read, to prefetch, never trusted for the comparison itself.
PyObject* first_moved(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tables = nullptr, *keys = nullptr, *expected_obj = nullptr, *layouts_obj = nullptr, *held = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!OO|O", &PyList_Type, &tables, &PyList_Type, &keys, &expected_obj, &layouts_obj,
                        &held)) {
    return nullptr;
  }
  TORCH_CHECK(THPVariable_Check(expected_obj) && THPVariable_Check(layouts_obj),
              "first_moved: expected and layouts must be tensors");
  const at::Tensor& expected = THPVariable_Unpack(expected_obj);
  const at::Tensor& layouts = THPVariable_Unpack(layouts_obj);
  const Py_ssize_t count = PyList_GET_SIZE(tables);
  TORCH_CHECK(PyList_GET_SIZE(keys) == count && expected.numel() == count && expected.is_cpu() &&
                  expected.scalar_type() == at::kLong && expected.is_contiguous() && layouts.is_cpu() &&
                  layouts.scalar_type() == at::kLong && layouts.is_contiguous(),
              "first_moved: tables, keys and expected must have one entry per slot; layouts an int64 CPU tensor");
  const int64_t* want = expected.data_ptr<int64_t>();
  const int64_t* layout = layouts.data_ptr<int64_t>();
  const int64_t* layout_end = layout + layouts.numel();
  const bool prefetch = held != nullptr && PyList_Check(held) && PyList_GET_SIZE(held) == count;
  if (prefetch) {
    for (Py_ssize_t j = 0; j < kAhead; ++j) prefetch_slot_objects(tables, keys, held, j, count);
    for (Py_ssize_t j = 0; j < kAhead / 2; ++j) prefetch_slot_tensor(tables, held, j, count);
  }
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (prefetch) {
      prefetch_slot_objects(tables, keys, held, i + kAhead, count);
      prefetch_slot_tensor(tables, held, i + kAhead / 2, count);
    }
    PyObject* value = PyDict_GetItemWithError(PyList_GET_ITEM(tables, i), PyList_GET_ITEM(keys, i));
    if (value == nullptr && PyErr_Occurred()) return nullptr;
    if (value == nullptr) return PyLong_FromSsize_t(i);
    TORCH_CHECK(layout < layout_end, "first_moved: layouts is shorter than the slots");
    int64_t code = *layout++;
    if (code == kNotATensor) {  // identity only
      if (reinterpret_cast<int64_t>(value) != want[i]) return PyLong_FromSsize_t(i);
      continue;
    }
    PyObject* owner = nullptr;  // a new reference to the DTensor's local tensor, if it is one
    if (code == kDTensor) {
      static PyObject* const local_name = PyUnicode_InternFromString("_local_tensor");  // built once
      owner = PyObject_GetAttr(value, local_name);
      if (owner == nullptr) {
        PyErr_Clear();
        return PyLong_FromSsize_t(i);
      }
      value = owner;
      code = *layout++;
    }
    Py_XDECREF(owner);  // the module's DTensor keeps its local tensor alive: `value` stays valid
    if (!THPVariable_Check(value)) return PyLong_FromSsize_t(i);
    const at::Tensor& tensor = THPVariable_Unpack(value);  // a reference: no refcount traffic
    const int64_t ndim = *layout++;
    const c10::IntArrayRef sizes = tensor.sizes(), strides = tensor.strides();
    // const_data_ptr: the address without materialising a copy-on-write storage
    const bool same = reinterpret_cast<int64_t>(tensor.const_data_ptr()) == want[i] &&
                      static_cast<int64_t>(tensor.scalar_type()) == code &&
                      static_cast<int64_t>(sizes.size()) == ndim && std::equal(sizes.begin(), sizes.end(), layout) &&
                      std::equal(strides.begin(), strides.end(), layout + ndim) &&
                      static_cast<int64_t>(tensor.requires_grad()) == layout[2 * ndim];
    if (!same) return PyLong_FromSsize_t(i);
    layout += 2 * ndim + 1;
  }
  return PyLong_FromLong(-1);
  END_HANDLE_TH_ERRORS
}

// record_layouts(tables, keys) -> int64 tensor: the `layouts` argument of first_moved for the
// entries as they are now (built here so the dtype codes are c10's own).
PyObject* record_layouts(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tables = nullptr, *keys = nullptr;
  if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &tables, &PyList_Type, &keys)) return nullptr;
  const Py_ssize_t count = PyList_GET_SIZE(tables);
  TORCH_CHECK(PyList_GET_SIZE(keys) == count, "record_layouts: one key per table");
  std::vector<int64_t> records;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* value = PyDict_GetItemWithError(PyList_GET_ITEM(tables, i), PyList_GET_ITEM(keys, i));
    if (value == nullptr && PyErr_Occurred()) return nullptr;
    if (value == nullptr || !THPVariable_Check(value)) {
      records.push_back(kNotATensor);
      continue;
    }
    if (PyObject_HasAttrString(value, "_local_tensor")) {  // once per plan: the cost does not matter
      PyObject* piece = PyObject_GetAttrString(value, "_local_tensor");
      if (piece == nullptr) return nullptr;
      const bool ok = THPVariable_Check(piece);
      Py_DECREF(piece);  // the DTensor keeps it alive
      if (ok) {
        records.push_back(kDTensor);
        value = PyObject_GetAttrString(value, "_local_tensor");
        Py_DECREF(value);
      }
    }
    const at::Tensor& tensor = THPVariable_Unpack(value);
    records.push_back(static_cast<int64_t>(tensor.scalar_type()));
    records.push_back(tensor.dim());
    for (const int64_t size : tensor.sizes()) records.push_back(size);
    for (const int64_t stride : tensor.strides()) records.push_back(stride);
    records.push_back(tensor.requires_grad());  // unfreezing a layer re-plans, and the shadow follows
  }
  at::Tensor out = at::empty({static_cast<int64_t>(records.size())}, at::kLong);
  std::copy(records.begin(), records.end(), out.data_ptr<int64_t>());
  return THPVariable_Wrap(out);
  END_HANDLE_TH_ERRORS
}

// cpu_kernel_isa() -> str: the instruction set of the CPU kernel that `update_` runs ("default",
// "avx2" or "avx512"), chosen at run time; RuntimeError if WAVG_FUSED_CPU_ISA names none of them.
PyObject* cpu_kernel_isa(PyObject* /*self*/, PyObject* /*args*/) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(wavg_fused::cpu::selected_kernels().isa);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"first_moved", first_moved, METH_VARARGS, "Index of the first slot whose tensor moved or changed layout (or whose module was replaced), or -1."},
    {"record_layouts", record_layouts, METH_VARARGS, "first_moved's layouts for the entries as they are now."},
    {"cpu_kernel_isa", cpu_kernel_isa, METH_NOARGS, "Instruction set of the CPU kernel update_ runs: default, avx2 or avx512."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
