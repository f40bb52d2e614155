// The `cpu` backend's steady-state update: the address watch and the kernel in one parallel
// region, called from Python directly rather than through the dispatcher.
//
// After serial work (an optimizer step over many small tensors) the OpenMP workers sleep, and on
// a virtual machine one joins a region 100-200 us late. The watch and the kernel as two regions
// waited for it in the first; here the threads already running take chunks of slots, then chunks
// of elements, from shared counters, and a late worker joins wherever they are. No element is
// written before every slot was checked: a moved slot leaves the averages untouched, and the
// caller takes its checked path. The kernel's part runs with the GIL released, as the op does.
#include <Python.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <memory>
#include <thread>
#include <vector>

#include "../address_watch.h"
#include "../method_params.h"
#include "host_plan.h"
#include "kernel_api.h"
#include "update_if_unmoved.h"

namespace wavg_fused::cpu {
namespace {

constexpr const char* kCapsuleName = "wavg_fused.cpu_bound_update";
constexpr int64_t kSlotsPerChunk = 256;

// `update_(flats, table, _, n_averaged, _, method, params, bump=True, rounding_seed, mode=average,
// guard=False, None)` with its arguments checked once and kept.
struct BoundUpdate {
  std::vector<at::Tensor> flats;
  at::Tensor table;
  // the counter's Python object (a strong reference), unpacked at every update as the op's
  // argument is: `n_averaged.data = ...` or swap_tensors give it another tensor, which the watch
  // does not follow
  PyObject* n_averaged = nullptr;
  int64_t method;
  std::vector<double> params;
  int64_t rounding_seed;
  HostPlan host;

  ~BoundUpdate() { Py_XDECREF(n_averaged); }  // with the GIL: the capsule's destructor or bind_update
};

void release_bound(PyObject* capsule) {
  delete static_cast<BoundUpdate*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

at::Tensor unpack_tensor(PyObject* object, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(object), "cpu_bind_update: ", name, " must be a tensor");
  return THPVariable_Unpack(object);
}

// A spin of a few microseconds, then yielding: a thread that holds a chunk may be descheduled
void relax(int64_t& spins) {
  if (++spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    return;
  }
  std::this_thread::yield();
}

// The GIL let go by the calling thread for the kernel's part, taken back when this goes out of
// scope (an exception included).
class ReleasedGil {
 public:
  ReleasedGil() = default;
  ReleasedGil(const ReleasedGil&) = delete;
  ReleasedGil& operator=(const ReleasedGil&) = delete;
  void release() {
    if (state_ == nullptr) state_ = PyEval_SaveThread();
  }
  ~ReleasedGil() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }

 private:
  PyThreadState* state_ = nullptr;
};

// Every plain slot checked (chunks claimed from `next_slots`), then, if none moved, every element
// updated (chunks claimed from `next_elements`); the calling thread lets go of the GIL between.
// An exception in a chunk (a tensor whose sizes cannot be read) counts as a move for the others
// and is rethrown once the region ends.
bool check_then_update(const WatchPass& watch, const BoundUpdate& bound, const PlanView& plan) {
  const Kernels& kernels = selected_kernels();
  const int64_t slots = watch.slot_count;
  const int64_t elements = bound.host.first.back();
  const int64_t element_threads = threads_for(bound.host.bytes);
  const int64_t threads = std::min<int64_t>(
      std::max(element_threads, (slots + kWatchSlotsPerThread - 1) / kWatchSlotsPerThread), at::get_num_threads());
  if (threads <= 1) {
    if (watch_first_plain_moved(watch, 0, slots) >= 0) return false;
    ReleasedGil gil;
    gil.release();
    if (elements > 0) kernels.process(plan, 0, elements);
    return true;
  }
  const int64_t slot_chunks = (slots + kSlotsPerChunk - 1) / kSlotsPerChunk;
  // as the op splits: one range where one thread's worth of bytes is all there is
  const int64_t per_chunk = element_threads > 1 ? elements_per_chunk(elements, bound.host.bytes) : std::max<int64_t>(elements, 1);
  std::atomic<int64_t> next_slots{0}, checked{0}, next_elements{0};
  std::atomic<bool> moved{false};
  std::mutex failure_mutex;
  std::exception_ptr failure;
  auto fail = [&] {
    std::lock_guard<std::mutex> lock(failure_mutex);
    if (!failure) failure = std::current_exception();
    moved.store(true);
  };
  const std::thread::id caller = std::this_thread::get_id();
  ReleasedGil gil;  // released by the calling thread only
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next_slots.fetch_add(1); c < slot_chunks; c = next_slots.fetch_add(1)) {
      try {
        if (!moved.load(std::memory_order_relaxed) &&
            watch_first_plain_moved(watch, c * kSlotsPerChunk, std::min(slots, (c + 1) * kSlotsPerChunk)) >= 0) {
          moved.store(true, std::memory_order_relaxed);
        }
      } catch (...) {
        fail();
      }
      checked.fetch_add(1, std::memory_order_release);
    }
    for (int64_t spins = 0; checked.load(std::memory_order_acquire) < slot_chunks;) relax(spins);
    if (moved.load(std::memory_order_relaxed)) return;
    if (std::this_thread::get_id() == caller) gil.release();
    try {
      for (int64_t begin = next_elements.fetch_add(per_chunk); begin < elements;
           begin = next_elements.fetch_add(per_chunk)) {
        kernels.process(plan, begin, std::min(begin + per_chunk, elements));
      }
    } catch (...) {
      fail();
    }
  });
  if (failure) std::rethrow_exception(failure);  // `gil` takes the GIL back as it leaves this function
  return !moved.load();
}

}  // namespace

PyObject* bind_update(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *flats = nullptr, *table = nullptr, *n_averaged = nullptr, *params = nullptr;
  long long method = 0, rounding_seed = -1;
  if (!PyArg_ParseTuple(args, "O!OOLO!L", &PyList_Type, &flats, &table, &n_averaged, &method, &PyList_Type, &params,
                        &rounding_seed)) {
    return nullptr;
  }
  auto bound = std::make_unique<BoundUpdate>();
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(flats); ++i) {
    bound->flats.push_back(unpack_tensor(PyList_GET_ITEM(flats, i), "each of flats"));
  }
  bound->table = unpack_tensor(table, "table");
  host_counter(unpack_tensor(n_averaged, "n_averaged"), "n_averaged");
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
    const double value = PyFloat_AsDouble(PyList_GET_ITEM(params, i));
    if (value == -1.0 && PyErr_Occurred()) return nullptr;
    bound->params.push_back(value);
  }
  check_plan(bound->flats, bound->table);
  Py_INCREF(n_averaged);
  bound->n_averaged = n_averaged;
  bound->method = method;
  bound->rounding_seed = rounding_seed;
  method_params(bound->params);  // an unknown method's parameter count fails here, not at the update
  bound->host = host_plan(bound->flats, bound->table, false);
  return PyCapsule_New(bound.release(), kCapsuleName, release_bound);
  END_HANDLE_TH_ERRORS
}

PyObject* update_if_unmoved(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *bound_capsule = nullptr, *watch_capsule = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &bound_capsule, &watch_capsule)) return nullptr;
  auto* bound = static_cast<BoundUpdate*>(PyCapsule_GetPointer(bound_capsule, kCapsuleName));
  if (bound == nullptr) return nullptr;
  WatchPass watch;
  if (!watch_begin(watch_capsule, watch)) return nullptr;
  const int64_t python_moved = watch_first_python_moved(watch, watch.slot_count);
  if (python_moved == -2) return nullptr;
  if (python_moved >= 0) Py_RETURN_FALSE;
  int64_t* counter = host_counter(unpack_tensor(bound->n_averaged, "n_averaged"), "n_averaged");
  RECORD_FUNCTION("wavg_fused::update_", std::vector<c10::IValue>());
  const Step k = Step::make(bound->method, method_params(bound->params), *counter, bound->rounding_seed);
  const PlanView plan{bound->table.data_ptr<int64_t>(), bound->host.first.data(), bound->table.size(0),
                      bound->host.flat_bases.data(), k, kModeAverage};
  if (!check_then_update(watch, *bound, plan)) Py_RETURN_FALSE;
  *counter += 1;
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

}  // namespace wavg_fused::cpu
