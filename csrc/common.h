// Shared by every kernel file: CUDA headers only, never torch (keeps nvcc fast).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastbert {

// Element types the kernels accept; the binding file maps torch dtypes onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride launch: enough to fill the device, never more than the work.
inline int grid_size(int64_t work_items, int items_per_block, int max_blocks = 65535 * 4) {
  int64_t blocks = ceil_div(work_items, items_per_block);
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks < max_blocks ? blocks : max_blocks);
}

}  // namespace fastbert
