// Dropout on a [rows, hidden] activation with Philox4x32-10 (Random123), counter-based: element
// (row, col) is kept iff
//     philox4x32_10(counter = {col / 4, row, 0, offset}, key = {seed_lo, seed_hi})[col % 4] < keep_threshold
// with keep_threshold = min(floor((1 - p) * 2^32), 2^32 - 1), and kept values are scaled by
// keep_scale = 1 / (1 - p). The forward and the backward regenerate the same mask from
// (seed, offset); the Python twin (fastbert/ops/bias_dropout_residual_layernorm.py, row_keep_mask)
// computes it bit for bit. Philox itself is csrc/philox.cuh, shared with the attention kernels.
// CUDA headers only.
#pragma once
#include <cmath>
#include <cstdint>
#include <cuda_runtime.h>

#include "philox.cuh"

namespace fastbert {

struct RowDropout {
  bool enabled;             // false: keep everything, scale 1 (p = 0, or evaluation)
  uint32_t keep_threshold;
  float keep_scale;         // 1 / (1 - p)
  uint64_t seed;
  uint32_t offset;
};

// The rule above for a dropout probability p in [0, 1).
inline RowDropout make_row_dropout(double p, uint64_t seed, uint32_t offset) {
  RowDropout d{};
  d.enabled = p > 0.0;
  const double threshold = std::floor((1.0 - p) * 4294967296.0);
  d.keep_threshold = threshold >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(threshold);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  d.seed = seed;
  d.offset = offset;
  return d;
}


// Bit j of the result: whether element (row, col0 + j) is kept, for j < VEC. One Philox call
// per 4 columns when col0 is a multiple of 4 and VEC of 4 (the vector path), else one per column.
template <int VEC>
__host__ __device__ __forceinline__ uint32_t row_dropout_keep_bits(const RowDropout& d, int64_t row, int64_t col0) {
  if (!d.enabled) return (VEC >= 32) ? 0xffffffffu : ((1u << VEC) - 1u);
  const uint2 key = philox_key(d.seed);
  uint32_t bits = 0;
  if (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const uint4 w = philox4x32_10(
          make_uint4(static_cast<uint32_t>(col0 / 4 + q), static_cast<uint32_t>(row), 0u, d.offset), key);
      bits |= (uint32_t(w.x < d.keep_threshold) | (uint32_t(w.y < d.keep_threshold) << 1) |
               (uint32_t(w.z < d.keep_threshold) << 2) | (uint32_t(w.w < d.keep_threshold) << 3)) << (4 * q);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t col = col0 + j;
      const uint4 w = philox4x32_10(
          make_uint4(static_cast<uint32_t>(col / 4), static_cast<uint32_t>(row), 0u, d.offset), key);
      const int k = static_cast<int>(col % 4);
      const uint32_t word = k == 0 ? w.x : k == 1 ? w.y : k == 2 ? w.z : w.w;
      bits |= uint32_t(word < d.keep_threshold) << j;
    }
  }
  return bits;
}

}  // namespace fastbert
