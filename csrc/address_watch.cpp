// The address watch's walk (wavg_fused/watch.py), the host work of every update: is each watched
// slot -- a (module dict, key) pair holding a parameter, a buffer or a submodule -- still holding
// what it held when the plans were built, at the same address and with the same view?
//
// watch_record(tables, keys) -> capsule records every slot once per plan; watch_first_moved(capsule)
// -> int is the per-update check. Why it is shaped this way (2,000 small tensors cost 40 ns a slot
// through dict lookups and generic tensor accessors, most of it cache and TLB misses):
//  * a dict is looked up again only if it was mutated since recording (CPython's dict version
//    tag, PEP 509, changes on every mutation); a module's slots then cost nothing beyond one load.
//    Where the tag is gone (CPython 3.14+, free-threaded builds) every slot is looked up.
//  * an entry still holding the recorded object is known to be that object: no type check, no
//    refcount traffic. Its tensor is still read through the object, since `p.data = ...` and
//    torch.utils.swap_tensors change what the same Python object holds.
//  * the objects a slot's check reads were recorded too, so they are prefetched from the record,
//    several slots ahead, without a chain of dependent loads; the check itself never trusts them.
// A tensor counts as unmoved when its data address, dtype, sizes, strides and requires_grad are
// as recorded (`p.data = p.data.t()` keeps the address and must count); a DTensor (an object with
// a `_local_tensor`) by its local tensor, where its bytes are; anything else (a submodule) by
// identity. An entry holding another object that matches by those rules counts as unmoved, as
// the walk in Python has it.
#include <Python.h>
#include <ATen/Parallel.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <typeinfo>
#include <vector>

#include "address_watch.h"

namespace {

#if PY_VERSION_HEX < 0x030E0000 && !defined(Py_GIL_DISABLED)
#define WAVG_DICT_VERSIONS 1
uint64_t dict_version(PyObject* dict) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;
#pragma GCC diagnostic pop
}
#else
#define WAVG_DICT_VERSIONS 0
uint64_t dict_version(PyObject*) { return 0; }
#endif

enum class Kind : int8_t { kIdentity, kTensor, kDTensor };

struct ExpectedTensor {
  int64_t address = 0;
  int64_t ndim = 0;
  size_t dims = 0;  // index of sizes then strides in Record::dims
  int16_t dtype = 0;
  bool watch_grad = true;  // whether requires_grad is part of the check
  bool requires_grad = false;
  // the autograd meta when recorded, if exactly an AutogradMeta: while the tensor still holds it,
  // its two flag fields are read directly, without the virtual call's vtable line. A meta freed
  // and a view's meta (a subclass) made at the same address would be read by the same two fields
  // (memory-safe; only its base's flag, which a view's own grad_fn_ mirrors, goes unread).
  const void* plain_meta = nullptr;
};

// Every cache line a slot's check reads, as recorded: the object's tensor pointer, the TensorImpl,
// the storage's data pointer and (when watched) the autograd meta's vtable and flag fields. A
// line left out of the prefetch is a miss the check waits for, one after another: with 4 of 8
// lines prefetched, a cold watch of 2,000x1k took 130 ns a slot.
constexpr int kMaxLines = 10;

struct WatchedSlot {
  PyObject* table;  // the three are strong references, released with the record
  PyObject* key;
  PyObject* value;
  size_t dict;  // index in Record::dicts
  Kind kind;
  int8_t line_count = 0;
  ExpectedTensor expected;
  const void* lines[kMaxLines];  // prefetched only: the check itself never trusts them
};

struct WatchedDict {
  PyObject* dict;  // borrowed: a slot holds it
  uint64_t version;
  size_t begin, end;  // the run of slots it holds
};

struct Record {
  std::vector<WatchedSlot> slots;
  std::vector<WatchedDict> dicts;
  std::vector<int64_t> dims;
  std::vector<size_t> python_slots;  // ascending: DTensors and submodules, whose check needs Python

  ~Record() {
    for (const WatchedSlot& slot : slots) {
      Py_DECREF(slot.table);
      Py_DECREF(slot.key);
      Py_DECREF(slot.value);
    }
  }
};

constexpr const char* kCapsuleName = "wavg_fused.address_watch";
constexpr size_t kAhead = 8;  // slots between a prefetch and the check that reads it

// The DTensor's local tensor (a new reference), nullptr (no error set) if `value` is none
PyObject* local_tensor(PyObject* value) {
  static PyObject* const name = PyUnicode_InternFromString("_local_tensor");
  PyObject* local = PyObject_GetAttr(value, name);
  if (local == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  if (!THPVariable_Check(local)) {
    Py_DECREF(local);
    return nullptr;
  }
  return local;
}

// What data_ptr() gives, without its virtual storage check (a wrapper subclass's empty storage,
// as a DTensor's own, gives 0)
int64_t data_address(const c10::TensorImpl* impl) {
  const c10::Storage& storage = impl->unsafe_storage();
  if (!storage || impl->numel() == 0) return 0;
  const char* data = static_cast<const char*>(storage.unsafeGetStorageImpl()->data());
  return reinterpret_cast<int64_t>(data + impl->dtype().itemsize() * impl->storage_offset());
}

// impl->requires_grad(), reading the recorded plain AutogradMeta's fields where the tensor still holds it
bool requires_grad(const c10::TensorImpl* impl, const ExpectedTensor& want) {
  const c10::AutogradMetaInterface* meta = impl->autograd_meta();
  if (meta != nullptr && meta == want.plain_meta) {
    const auto* plain = static_cast<const torch::autograd::AutogradMeta*>(meta);
    return plain->requires_grad_ || plain->grad_fn_;  // AutogradMeta::requires_grad(), not virtually
  }
  return impl->requires_grad();
}

bool tensor_as_recorded(const c10::TensorImpl* impl, const ExpectedTensor& want, const int64_t* dims) {
  const c10::IntArrayRef sizes = impl->sizes();
  if (static_cast<int64_t>(sizes.size()) != want.ndim) return false;
  const c10::IntArrayRef strides = impl->strides();
  for (int64_t d = 0; d < want.ndim; ++d) {
    if (sizes[d] != dims[d] || strides[d] != dims[want.ndim + d]) return false;
  }
  return static_cast<int16_t>(c10::typeMetaToScalarType(impl->dtype())) == want.dtype &&
         data_address(impl) == want.address && (!want.watch_grad || requires_grad(impl, want) == want.requires_grad);
}

// Whether `value` (a slot's entry now) matches the slot as recorded; `same_object` when it is the
// recorded object itself, whose type needs no check.
bool slot_as_recorded(const Record& record, const WatchedSlot& slot, PyObject* value, bool same_object) {
  switch (slot.kind) {
    case Kind::kIdentity:
      return same_object;
    case Kind::kTensor:
      if (!same_object && !THPVariable_Check(value)) return false;
      return tensor_as_recorded(THPVariable_Unpack(value).unsafeGetTensorImpl(), slot.expected,
                                record.dims.data() + slot.expected.dims);
    case Kind::kDTensor: {
      PyObject* local = local_tensor(value);
      if (local == nullptr) return false;
      const bool same = tensor_as_recorded(THPVariable_Unpack(local).unsafeGetTensorImpl(), slot.expected,
                                           record.dims.data() + slot.expected.dims);
      Py_DECREF(local);
      return same;
    }
  }
  return false;
}

void prefetch(const WatchedSlot& slot) {
  for (int8_t i = 0; i < slot.line_count; ++i) __builtin_prefetch(slot.lines[i]);
}

// Adds the cache lines of [begin, begin + bytes) not already listed.
void add_lines(WatchedSlot& slot, const void* begin, size_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(begin) & ~uintptr_t{63};
  const uintptr_t last = (reinterpret_cast<uintptr_t>(begin) + std::max<size_t>(bytes, 1) - 1) & ~uintptr_t{63};
  for (uintptr_t line = first; line <= last && slot.line_count < kMaxLines; line += 64) {
    const void* address = reinterpret_cast<const void*>(line);
    if (std::find(slot.lines, slot.lines + slot.line_count, address) == slot.lines + slot.line_count) {
      slot.lines[slot.line_count++] = address;
    }
  }
}

void record_tensor(Record& record, WatchedSlot& slot, const c10::TensorImpl* impl, bool watch_grad) {
  ExpectedTensor& want = slot.expected;
  want.address = data_address(impl);
  want.dtype = static_cast<int16_t>(c10::typeMetaToScalarType(impl->dtype()));
  want.ndim = impl->dim();
  want.watch_grad = watch_grad;
  want.requires_grad = impl->requires_grad();
  want.dims = record.dims.size();
  for (const int64_t size : impl->sizes()) record.dims.push_back(size);
  for (const int64_t stride : impl->strides()) record.dims.push_back(stride);
  // the object's tensor pointer follows its PyObject header; a TensorImpl's fields the check
  // reads span all of it but the refcounts and vtable
  add_lines(slot, reinterpret_cast<const char*>(slot.value) + sizeof(PyObject), sizeof(void*));
  add_lines(slot, reinterpret_cast<const char*>(impl) + 16, sizeof(c10::TensorImpl) - 16);
  if (const c10::StorageImpl* storage = impl->unsafe_storage().unsafeGetStorageImpl()) {
    add_lines(slot, &storage->data_ptr(), sizeof(void*));
  }
  if (watch_grad && impl->autograd_meta() != nullptr) {
    // requires_grad() reads requires_grad_ and grad_fn_, through a virtual call (the vtable
    // pointer) unless the meta is exactly an AutogradMeta: one line less for the three in four
    // metas whose vtable pointer is not on grad_fn_'s line
    const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
    if (typeid(*meta) == typeid(torch::autograd::AutogradMeta)) {
      want.plain_meta = meta;
    } else {
      add_lines(slot, meta, sizeof(void*));
    }
    add_lines(slot, &meta->requires_grad_, sizeof(bool));
    add_lines(slot, &meta->grad_fn_, sizeof(void*));
  }
}

void release_record(PyObject* capsule) {
  delete static_cast<Record*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

}  // namespace

namespace wavg_fused {

PyObject* watch_record(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *tables = nullptr, *keys = nullptr;
  Py_ssize_t grad_slots = PY_SSIZE_T_MAX;  // slots [0, grad_slots) have requires_grad watched too
  if (!PyArg_ParseTuple(args, "O!O!|n", &PyList_Type, &tables, &PyList_Type, &keys, &grad_slots)) return nullptr;
  const Py_ssize_t count = PyList_GET_SIZE(tables);
  TORCH_CHECK(PyList_GET_SIZE(keys) == count, "watch_record: one key per table");
  auto record = std::make_unique<Record>();
  record->slots.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* table = PyList_GET_ITEM(tables, i);
    PyObject* key = PyList_GET_ITEM(keys, i);
    TORCH_CHECK(PyDict_Check(table), "watch_record: slot ", i, " is not in a dict");
    PyObject* value = PyDict_GetItemWithError(table, key);
    if (value == nullptr && PyErr_Occurred()) return nullptr;
    TORCH_CHECK(value != nullptr, "watch_record: slot ", i, " is empty");
    if (record->dicts.empty() || record->dicts.back().dict != table) {
      record->dicts.push_back({table, dict_version(table), static_cast<size_t>(i), static_cast<size_t>(i)});
    }
    record->dicts.back().end = static_cast<size_t>(i) + 1;
    Py_INCREF(table);
    Py_INCREF(key);
    Py_INCREF(value);
    WatchedSlot slot{table, key, value, record->dicts.size() - 1, Kind::kIdentity, 0, {}, {}};
    record->slots.push_back(slot);  // owns the references from here on
    WatchedSlot& kept = record->slots.back();
    if (THPVariable_Check(value)) {
      PyObject* local = local_tensor(value);
      kept.kind = local != nullptr ? Kind::kDTensor : Kind::kTensor;
      record_tensor(*record, kept, THPVariable_Unpack(local != nullptr ? local : value).unsafeGetTensorImpl(),
                    i < grad_slots);
      Py_XDECREF(local);  // the DTensor keeps its local tensor alive
    }
    if (kept.kind != Kind::kTensor) record->python_slots.push_back(static_cast<size_t>(i));
  }
  return PyCapsule_New(record.release(), kCapsuleName, release_record);
  END_HANDLE_TH_ERRORS
}

bool watch_begin(PyObject* capsule, WatchPass& pass) {
  auto* record = static_cast<Record*>(PyCapsule_GetPointer(capsule, kCapsuleName));
  if (record == nullptr) return false;
  pass.record = record;
  pass.slot_count = static_cast<int64_t>(record->slots.size());
  pass.mutated.assign(record->dicts.size(), !WAVG_DICT_VERSIONS);
  if (WAVG_DICT_VERSIONS) {
    for (size_t d = 0; d < record->dicts.size(); ++d) {
      pass.mutated[d] = dict_version(record->dicts[d].dict) != record->dicts[d].version;
    }
  }
  return true;
}

// Slots whose entry is known to be the recorded object and needs no Python (a plain tensor in an
// unmutated dict). It reads C++ fields of objects the record keeps alive while the calling
// thread holds the GIL and waits; nothing calls into Python.
int64_t watch_first_plain_moved(const WatchPass& pass, int64_t begin, int64_t end) {
  const Record& record = *static_cast<const Record*>(pass.record);
  for (int64_t i = begin; i < std::min(begin + static_cast<int64_t>(kAhead), end); ++i) prefetch(record.slots[i]);
  for (int64_t i = begin; i < end; ++i) {
    if (i + static_cast<int64_t>(kAhead) < end) prefetch(record.slots[i + kAhead]);
    const WatchedSlot& slot = record.slots[i];
    if (pass.mutated[slot.dict] || slot.kind != Kind::kTensor || slot_as_recorded(record, slot, slot.value, true)) {
      continue;
    }
    return i;
  }
  return -1;
}

// The slots that need Python, below `below`: a mutated dict's, looked up again, and the DTensors
// and submodules of the others.
int64_t watch_first_python_moved(const WatchPass& pass, int64_t below) {
  const Record& record = *static_cast<const Record*>(pass.record);
  int64_t moved = below;
  for (const WatchedDict& dict : record.dicts) {
    if (!pass.mutated[&dict - record.dicts.data()]) continue;
    const int64_t end = std::min(static_cast<int64_t>(dict.end), moved);
    for (int64_t i = static_cast<int64_t>(dict.begin); i < end; ++i) {
      const WatchedSlot& slot = record.slots[i];
      PyObject* value = PyDict_GetItemWithError(slot.table, slot.key);
      if (value == nullptr && PyErr_Occurred()) return -2;
      if (value == nullptr || !slot_as_recorded(record, slot, value, value == slot.value)) {
        moved = i;
        break;
      }
    }
  }
  for (const size_t i : record.python_slots) {
    if (static_cast<int64_t>(i) >= moved) break;
    const WatchedSlot& slot = record.slots[i];
    if (pass.mutated[slot.dict]) continue;  // looked up above
    if (!slot_as_recorded(record, slot, slot.value, true)) {
      moved = static_cast<int64_t>(i);
      break;
    }
  }
  return moved < below ? moved : -1;
}

PyObject* watch_first_moved(PyObject* /*self*/, PyObject* capsule) {
  HANDLE_TH_ERRORS
  WatchPass pass;
  if (!watch_begin(capsule, pass)) return nullptr;
  const int64_t count = pass.slot_count;
  // the plain slots in parallel: the walk is bound by how many cache misses are in flight at
  // once, and each thread adds its own
  std::atomic<int64_t> first{count};
  at::parallel_for(0, count, kWatchSlotsPerThread, [&](int64_t begin, int64_t end) {
    const int64_t moved = watch_first_plain_moved(pass, begin, end);
    if (moved < 0) return;
    int64_t seen = first.load();
    while (moved < seen && !first.compare_exchange_weak(seen, moved)) {
    }
  });
  const int64_t plain = first.load();
  const int64_t python = watch_first_python_moved(pass, plain);
  if (python == -2) return nullptr;
  const int64_t moved = python >= 0 ? python : plain;
  return PyLong_FromLongLong(moved < count ? moved : -1);
  END_HANDLE_TH_ERRORS
}

}  // namespace wavg_fused
