// The check both host-side kernels (cpu, cuda-emulated) make before they dereference a tensor
// table in host memory: each row names one of the storage buffers, with its element size, and
// lies inside it. (On the GPU the table lives in device memory and is not read on the host.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "wavg_rule.h"

namespace wavg_fused {

inline void check_rows_in_buffers(at::TensorList flats, const at::Tensor& table, const char* op) {
  const int64_t* rows = table.data_ptr<int64_t>();
  for (int64_t t = 0; t < table.size(0); ++t) {
    const int64_t* row = rows + t * kNumColumns;
    if (row[kNumel] == 0) continue;
    TORCH_CHECK(row[kFlat] >= 0 && row[kFlat] < static_cast<int64_t>(flats.size()), op, ": tensor ", t,
                " names storage buffer ", row[kFlat], " of ", flats.size());
    const at::Tensor& flat = flats[row[kFlat]];
    TORCH_CHECK(static_cast<int64_t>(flat.element_size()) == row[kItemsize] && row[kShadowOffset] >= 0 &&
                    row[kShadowOffset] + row[kNumel] <= flat.numel() && row[kModelPtr] != 0,
                op, ": tensor ", t, " lies outside its storage buffer");
  }
}

}  // namespace wavg_fused
