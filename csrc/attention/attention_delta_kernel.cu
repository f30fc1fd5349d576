// The attention backward's preprocessing: delta[h, t] = sum_d dout[t, h, d] * out[t, h, d] in fp32,
// one pass reading dout and out once (16-byte loads). A group of head_dim / 8 lanes owns one
// (head, token) row and reduces with shuffles; row r = h * total + t, so consecutive groups write
// consecutive delta entries.
#include "attention/attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_utils.cuh"

namespace fastbert {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(kAttentionDeltaThreads) attention_bwd_delta_kernel(const AttentionDeltaParams p) {
  constexpr int kGroup = D / 8, kRowsPerBlock = kAttentionDeltaThreads / kGroup;
  const int sub = threadIdx.x % kGroup;
  const int64_t rows = static_cast<int64_t>(p.heads) * p.total_tokens;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; r0 < rows;
       r0 += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {  // uniform over the block: every lane shuffles
    const int64_t r = r0 + threadIdx.x / kGroup;
    float acc = 0.f;
    if (r < rows) {
      const int64_t h = r / p.total_tokens, t = r % p.total_tokens;
      const Pack<T, 8> a = *reinterpret_cast<const Pack<T, 8>*>(static_cast<const T*>(p.dout) + t * p.dout_row_stride +
                                                                 h * p.dout_head_stride + sub * 8);
      const Pack<T, 8> b = *reinterpret_cast<const Pack<T, 8>*>(static_cast<const T*>(p.out) + t * p.out_row_stride +
                                                                 h * p.out_head_stride + sub * 8);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc = fmaf(to_float(a.v[i]), to_float(b.v[i]), acc);
    }
#pragma unroll
    for (int o = kGroup / 2; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (r < rows && sub == 0) p.delta[r] = acc;
  }
}

template <typename T, int D>
struct DeltaLauncher {
  static cudaError_t run(const AttentionDeltaParams& p) {
    constexpr int kRowsPerBlock = kAttentionDeltaThreads / (D / 8);
    const int blocks = grid_size(static_cast<int64_t>(p.heads) * p.total_tokens, kRowsPerBlock);
    FASTBERT_LAUNCH(blocks, kAttentionDeltaThreads, 0, p.stream, attention_bwd_delta_kernel<T, D>)(p);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t attention_bwd_delta(const AttentionDeltaParams& p) {
  if (p.heads == 0 || p.total_tokens == 0) return cudaSuccess;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.dtype != DType::kFloat16 && !bf16) return cudaErrorInvalidValue;
  switch (p.head_dim) {
    case 32: return bf16 ? DeltaLauncher<__nv_bfloat16, 32>::run(p) : DeltaLauncher<__half, 32>::run(p);
    case 64: return bf16 ? DeltaLauncher<__nv_bfloat16, 64>::run(p) : DeltaLauncher<__half, 64>::run(p);
    case 128: return bf16 ? DeltaLauncher<__nv_bfloat16, 128>::run(p) : DeltaLauncher<__half, 128>::run(p);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fastbert
