// Shared by every kernel file: CUDA headers only, never torch (keeps nvcc fast).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// Launches and dynamic shared memory go through these two macros so that the kernel emulator
// (csrc/emu/cuda_emu.h, which defines them first) can compile the kernels as host C++:
//   FASTBERT_LAUNCH(grid, block, smem, stream, kernel<T>)(args...)  is  kernel<T><<<grid, block, smem, stream>>>(args...)
//   FASTBERT_DYNAMIC_SHARED(T, name);  is  extern __shared__ __align__(16) T name[];
#ifndef FASTBERT_LAUNCH
#define FASTBERT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef FASTBERT_DYNAMIC_SHARED
#define FASTBERT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

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
