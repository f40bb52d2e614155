// Host side of the op's `float[] params` argument: checked and copied into the fixed-size
// MethodParams the kernels take (by value on the GPU, so no device buffer is needed).
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include "wavg_rule.h"

namespace wavg_fused {

inline MethodParams method_params(c10::ArrayRef<double> params) {
  TORCH_CHECK(params.size() <= static_cast<size_t>(kMaxParams), "wavg_fused.update_: at most ", kMaxParams,
              " method parameters, got ", params.size());
  MethodParams out{};
  for (size_t i = 0; i < params.size(); ++i) out.v[i] = params[i];
  return out;
}

}  // namespace wavg_fused
