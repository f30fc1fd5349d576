// The block-wide sum the row kernels (layernorm, bias_dropout_residual_layernorm) reduce their
// per-row statistics with: one copy instead of one per kernel file. CUDA headers only.
#pragma once
#include <cuda_runtime.h>

namespace fastbert {

__device__ __forceinline__ float2 warp_sum(float2 v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
  }
  return v;
}

// Sum over the block, the same value in every thread: each warp's sum, then the warps' sums added
// in the same order in every thread (deterministic). blockDim.x is a multiple of 32 (at most 1024);
// smem holds 32 float2 and may be reused right after the call returns.
__device__ __forceinline__ float2 block_sum(float2 v, float2* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float2 total = make_float2(0.f, 0.f);
  for (int w = 0; w < num_warps; ++w) {
    total.x += smem[w].x;
    total.y += smem[w].y;
  }
  __syncthreads();  // smem may be written again by the next call
  return total;
}

}  // namespace fastbert
