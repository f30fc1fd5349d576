// Flash-style fused attention for BERT (bidirectional, padding-free): plain params structs and
// launchers, CUDA headers only. Layout: q, k, v, out are packed [total_tokens, heads, head_dim]
// (last dim contiguous, rows/heads strided); sequence b owns tokens [cu_seqlens[b], cu_seqlens[b+1]).
// lse is [heads, total_tokens] fp32, natural log of sum_j exp(scale * q.k_j).
#pragma once
#include "common.h"

namespace fastbert {

// The launch shape of the forward and backward kernels, and the head sizes they are built for.
// The launchers, the binding (attention_smem_bytes) and scripts/kernel_report.py read these.
constexpr int kAttentionThreads = 128;   // 4 warps
constexpr int kAttentionBlockM = 64;     // query rows per tile (4 warps x 16)
constexpr int kAttentionBlockN = 64;     // keys per tile
constexpr int kAttentionLdT = 64 + 8;    // row length of the transposed tiles ([head_dim][64 tokens])
constexpr int kAttentionHeadDims[] = {32, 64, 128};

// The forward's tile: kAttentionFwdBlockM query rows per CTA (4 warps x 16 rows, kAttentionThreads)
// against attention_fwd_block_n(head_dim) keys per main-loop iteration (128; 64 at head_dim 128,
// where a warp's 16 x 128 output accumulators already take 64 registers).
constexpr int kAttentionFwdBlockM = 64;
constexpr int attention_fwd_block_n(int head_dim) { return head_dim >= 128 ? 64 : 128; }

// Dynamic shared memory the forward launcher requests for head_dim and a 2-byte element type:
// sQ [64][head_dim + 8] and two buffers (double buffering) of sK, sV [block_n][head_dim + 8]
// (rows padded by 16 bytes, so the 8 rows an ldmatrix phase reads fall in distinct banks).
constexpr size_t attention_fwd_smem_bytes(int head_dim, int element_size) {
  return static_cast<size_t>((kAttentionFwdBlockM + 4 * attention_fwd_block_n(head_dim)) * (head_dim + 8)) *
         element_size;
}

// The backward's: sK, sV, sQ, sdO [64][head_dim + 8]; sKt, sQt, sdOt [head_dim][kAttentionLdT];
// sdS [64][kAttentionLdT]; lse and delta, 64 floats each.
constexpr size_t attention_bwd_smem_bytes(int head_dim, int element_size) {
  return static_cast<size_t>(4 * 64 * (head_dim + 8) + 3 * head_dim * kAttentionLdT + kAttentionBlockM * kAttentionLdT) *
             element_size + 2 * kAttentionBlockM * sizeof(float);
}

// Dropout on the attention probabilities: element (token t, head h, key j) of a sequence is
// kept iff philox4x32_10(counter = {j / 4, t, h, offset}, key = {seed_lo, seed_hi})[j % 4]
// < keep_threshold, with keep_threshold = min(floor((1 - p) * 2^32), 2^32 - 1); kept values are
// scaled by 1 / (1 - p). t is the packed token index of the query, j the key's position in its
// sequence. The forward, the backward and attention_dropout_mask use this one rule.
struct AttentionDropout {
  bool enabled;
  uint32_t keep_threshold;
  float keep_scale;    // 1 / (1 - p)
  uint64_t seed;
  uint32_t offset;
};

// What the forward and the backward share: the packed q, k, v and their sequences.
struct AttentionProblem {
  const void* q;
  const void* k;
  const void* v;
  const int32_t* cu_seqlens;      // [batch + 1], validated by the caller
  int64_t q_row_stride, q_head_stride;  // in elements; must be multiples of 8
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int batch, heads, head_dim, max_seqlen;
  int64_t total_tokens;
  float scale;
  AttentionDropout dropout;
  DType dtype;                    // kFloat16 or kBFloat16
  cudaStream_t stream;
};

struct AttentionFwdParams : AttentionProblem {
  void* out;                      // [total, heads, head_dim], contiguous
  float* lse;                     // [heads, total]
};

struct AttentionBwdParams : AttentionProblem {
  const void* dout;               // [total, heads, head_dim], contiguous
  const float* lse;               // [heads, total], from the forward
  const float* delta;             // [heads, total], rowsum(dout * out) in fp32
  float* dq_accum;                // [total, heads, head_dim] fp32, zeroed by the caller
  void* dk;                       // [total, heads, head_dim], contiguous
  void* dv;                       // [total, heads, head_dim], contiguous
};

// keep[b, h, i, j] (uint8 0/1, [batch, heads, max_seqlen, max_seqlen]) of the rule above; 0
// outside the sequence (i or j >= its length). For tests: a twin taking this mask must match.
struct AttentionDropoutMaskParams {
  const int32_t* cu_seqlens;
  uint8_t* keep;
  int batch, heads, max_seqlen;
  AttentionDropout dropout;
  cudaStream_t stream;
};

cudaError_t attention_fwd(const AttentionFwdParams& p);
cudaError_t attention_bwd(const AttentionBwdParams& p);
cudaError_t attention_dropout_mask(const AttentionDropoutMaskParams& p);

}  // namespace fastbert
