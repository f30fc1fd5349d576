// The attention dropout mask (attention.h's rule) for tests: the twin given this mask must match.
#include "attention/attention_common.cuh"

namespace fastbert {
namespace {

__global__ void attention_dropout_mask_kernel(const AttentionDropoutMaskParams p) {
  const int64_t n = p.max_seqlen;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * n * n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(idx % n);
    const int i = static_cast<int>((idx / n) % n);
    const int h = static_cast<int>((idx / (n * n)) % p.heads);
    const int b = static_cast<int>(idx / (n * n * p.heads));
    const int start = p.cu_seqlens[b];
    const int len = p.cu_seqlens[b + 1] - start;
    uint8_t keep = 0;
    if (i < len && j < len) {
      keep = !p.dropout.enabled || dropout_keep(p.dropout, start, h, i, j);
    }
    p.keep[idx] = keep;
  }
}

}  // namespace

cudaError_t attention_dropout_mask(const AttentionDropoutMaskParams& p) {
  const int64_t n = static_cast<int64_t>(p.batch) * p.heads * p.max_seqlen * p.max_seqlen;
  if (n == 0) return cudaSuccess;
  FASTBERT_LAUNCH(grid_size(n, 256), 256, 0, p.stream, attention_dropout_mask_kernel)(p);
  return cudaGetLastError();
}

}  // namespace fastbert
