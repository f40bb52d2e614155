// The averaging rule, shared by the CPU and CUDA kernels: the step weight w_n of each method, the
// element update, and the layout of the plan's tensor table. The numbers mirror
// wavg_fused/plan.py (COLUMNS, DTYPE_CODES, ROLE_*) and wavg_fused/methods.py (Method.code).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace wavg_fused {

enum Method : int64_t { kEMA = 0, kSWA = 1, kTADEMA = 2, kEMAWarmup = 3, kPowerEMA = 4 };

// A method's hyperparameters (Method.params), unused slots 0; passed to the CUDA kernel by value.
constexpr int kMaxParams = 4;
struct MethodParams {
  double v[kMaxParams];
};

enum Dtype : int64_t {
  kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3,
  kInt64 = 4, kInt32 = 5, kInt16 = 6, kInt8 = 7, kUInt8 = 8, kBool = 9, kOther = 15,
};

enum Role : int64_t { kCopy = 0, kAverage = 1 };

// What one launch does with each (shadow, model) pair of the plan. kAverage... (the update) is the
// only one that reads the method; the others write the *model* tensors, for swapping the average in.
enum Mode : int64_t {
  kModeAverage = 0,      // shadow <- averaged(shadow, model), or a copy of the model (role kCopy)
  kModeCopyToModel = 1,  // model <- shadow, cast to the model's dtype
  kModeSwap = 2,         // exchange shadow and model element by element (equal dtypes only)
  kModeCheck = 3,        // set workspace[kNonfiniteSlot] if an averaged model value is Inf or NaN
};

// The op's int32 workspace: [0] counts finished CUDA blocks (last-block detection), [1] is the
// non-finite flag that a kModeCheck pass sets and the guarded update reads and clears, so the
// skip is decided on the device. Both are zero between updates.
constexpr int64_t kBlocksDoneSlot = 0;
constexpr int64_t kNonfiniteSlot = 1;
constexpr int64_t kWorkspaceSlots = 2;

enum Column : int64_t {
  kModelPtr = 0, kFlat, kShadowOffset, kNumel, kModelDtype, kShadowDtype, kRole, kFlags,
  kItemsize, kNumColumns,
};

constexpr int64_t kFlagAligned = 1;
// Storage buffers per device (one per dtype); the CUDA kernel takes their addresses by value.
constexpr int kMaxFlats = 16;

// x^y for x > 0 as exp(y log x): inline on the GPU, where pow() is an out-of-line call whose
// calling convention made the kernel spill registers; the same formula on every backend (Triton too).
C10_HOST_DEVICE inline double positive_pow(double x, double y) { return ::exp(y * ::log(x)); }

// a * b rounded on its own, never fused with a following add: nvcc contracts by default and g++
// on x86-64 does not, and the weight must be the same double in the CUDA kernel and on the host.
C10_HOST_DEVICE inline double multiply_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// w_n for n = updates averaged so far; w_0 = 1 for every method (the first update copies).
// Double precision: the kernels round it once to their compute type.
C10_HOST_DEVICE inline double step_weight(int64_t method, const MethodParams& p, int64_t n) {
  switch (method) {
    case kEMA:
      return n == 0 ? 1.0 : 1.0 - p.v[0];
    case kSWA:
      return 1.0 / (static_cast<double>(n) + 1.0);
    case kTADEMA:
      return 1.0 - multiply_rn(p.v[0], ::tanh(static_cast<double>(n)));
    case kEMAWarmup: {  // v = (max decay, inv_gamma, power, min decay), as diffusers' EMAModel
      if (n == 0) return 1.0;
      const double decay = 1.0 - positive_pow(1.0 + static_cast<double>(n) / p.v[1], -p.v[2]);
      return 1.0 - ::fmin(::fmax(decay, p.v[3]), p.v[0]);
    }
    case kPowerEMA: {  // v[0] = gamma (Karras et al. 2024): w = 1 - (n / (n + 1))^(gamma + 1)
      if (n == 0) return 1.0;
      const double x = static_cast<double>(n);
      return 1.0 - positive_pow(x / (x + 1.0), p.v[0] + 1.0);
    }
    default:
      return 1.0;
  }
}

// The element update s + w (m - s), written as torch.lerp does: from the nearer end, so w = 1
// returns m exactly (the first update copies) and the result stays between s and m.
// T is float, double, or a vector type with +, - and * (at::vec::Vectorized).
template <typename T>
C10_HOST_DEVICE inline T averaged(T s, T m, T w, T one_minus_w, bool from_shadow) {
  return from_shadow ? s + w * (m - s) : m - (m - s) * one_minus_w;
}

// Inf or NaN: every exponent bit set. Tested on the raw bits, so it is one AND and one compare
// per element for every float format, and fast-math cannot fold it away as it can isfinite().
template <typename Bits>
C10_HOST_DEVICE constexpr bool nonfinite_bits(Bits bits, Bits exponent) {
  return (bits & exponent) == exponent;
}
constexpr uint16_t kExponentF16 = 0x7C00u;
constexpr uint16_t kExponentBF16 = 0x7F80u;
constexpr uint32_t kExponentF32 = 0x7F800000u;
constexpr uint64_t kExponentF64 = 0x7FF0000000000000ull;

// Everything one update's element kernels need besides the data, built the same way on CPU and GPU.
struct Step {
  double w;               // w_n
  bool from_shadow;       // which end `averaged` starts from (torch.lerp's rule: w < 0.5)
  int64_t rounding_seed;  // < 0: round to nearest; else stochastic rounding of bf16 shadows
  int64_t n_averaged;     // n, before this update (keys the rounding bits)

  C10_HOST_DEVICE static Step make(int64_t method, const MethodParams& params, int64_t n, int64_t seed) {
    const double w = step_weight(method, params, n);
    return Step{w, w < 0.5, seed, n};
  }
  template <typename T>
  C10_HOST_DEVICE T weight() const { return static_cast<T>(w); }
  // 1 - w rounded as torch.lerp rounds it: from the weight in T, not from the double (they differ
  // by an ulp for most w >= 0.5, and EMA/SWA promise torch's lerp bit for bit)
  template <typename T>
  C10_HOST_DEVICE T one_minus() const { return static_cast<T>(1) - static_cast<T>(w); }
};

// ---- stochastic rounding to bfloat16 -------------------------------------------------------
// Counter-based random bits (Philox4x32-10, Salmon et al. 2011): a pure function of
// (seed, update count, element index), so every rank and every backend draws the same bits for
// the same element of the same update, and a replayed update reproduces its result.
struct Random4 {
  uint32_t v[4];
};

C10_HOST_DEVICE inline Random4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                            uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c0 = n0;
    c1 = static_cast<uint32_t>(p1);
    c2 = n2;
    c3 = static_cast<uint32_t>(p0);
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Random4{{c0, c1, c2, c3}};
}

// 32 random bits for each of the four elements 4*group .. 4*group+3 of the storage buffer.
C10_HOST_DEVICE inline Random4 rounding_bits(int64_t seed, int64_t n_averaged, int64_t group) {
  const auto g = static_cast<uint64_t>(group), n = static_cast<uint64_t>(n_averaged);
  const auto k = static_cast<uint64_t>(seed);
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), static_cast<uint32_t>(n),
                       static_cast<uint32_t>(n >> 32), static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32));
}

// bfloat16 bits of `value` rounded up or down at random, with probability proportional to the
// distance, so the expected result is `value` itself: an EMA whose step is below half a bf16 ulp
// still moves on average (round-to-nearest would drop every such step).
C10_HOST_DEVICE inline uint16_t stochastic_round_bf16(float value, uint32_t random) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7F800000u) != 0x7F800000u) bits += random & 0xFFFFu;  // Inf and NaN stay as they are
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace wavg_fused
