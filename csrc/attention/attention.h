// Flash-style fused attention for BERT (bidirectional, padding-free): plain params structs and
// launchers, CUDA headers only. Layout: q, k, v, out are packed [total_tokens, heads, head_dim]
// (last dim contiguous, rows/heads strided); sequence b owns tokens [cu_seqlens[b], cu_seqlens[b+1]).
// lse is [heads, total_tokens] fp32, natural log of sum_j exp(scale * q.k_j).
#pragma once
#include <cmath>

#include "common.h"

namespace fastbert {

// The launch shape of the forward and backward kernels, and the head sizes they are built for.
// The launchers, the binding (attention_smem_bytes) and scripts/kernel_report.py read these.
constexpr int kAttentionThreads = 128;   // 4 warps
constexpr int kAttentionBlockM = 64;     // query rows per tile (4 warps x 16)
constexpr int kAttentionBlockN = 64;     // keys per tile
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

// The backward's (attention_bwd_kernel.cu, BwdSmem): sK, sV, sQ x 2, sdO [64][head_dim + 8];
// sdS [64][64 + 8]; lse and delta [2][64] floats each; dropout bits [2][2][32][2] words.
constexpr size_t attention_bwd_smem_bytes(int head_dim, int element_size) {
  return static_cast<size_t>(5 * 64 * (head_dim + 8) + kAttentionBlockN * (kAttentionBlockM + 8)) * element_size +
         (2 * 2 * kAttentionBlockM + 2 * 2 * 32 * 2) * sizeof(float);
}

// Dropout on the attention probabilities, one Philox4x32-10 call (csrc/philox.cuh) per 16
// elements with 8-bit thresholds (FlashAttention-2's economy). Element (query i, key j) -- positions
// in sequence b, whose first packed token is cu = cu_seqlens[b] -- of head h lies in the 16 x 32
// block (ib, jb) = (i / 16, j / 32) at (r, c) = (i % 16, j % 32), and takes
//     lane = (r % 8) * 4 + (c % 8) / 2,   byte = (c / 8) * 4 + (r / 8) * 2 + c % 2,
//     w = philox4x32_10(counter = {32 * jb + lane, cu + 16 * ib, h, offset}, key = {seed_lo, seed_hi}),
// and is kept iff byte `byte` of w (word byte / 4, bits 8 * (byte % 4) and up) < keep_threshold,
// keep_threshold = clamp(rint((1 - p) * 256), 1, 256); kept values are scaled by keep_scale =
// 256 / keep_threshold, so the keep probability is keep_threshold / 256 (p = 0.1: 230 / 256).
// lane and byte are the mma.m16n8k16 C-fragment layout of a warp holding 16 query rows and 32
// keys: thread lane's element e of n8 fragment nt is byte 4 * (nt % 4) + e of its own call. The
// forward, the backward and attention_dropout_mask use this one rule; fastbert/ops/attention.py
// (dropout_keep_mask) is its twin.
struct AttentionDropout {
  bool enabled;
  uint32_t keep_threshold;  // 1 .. 256, compared with one random byte
  float keep_scale;         // 256 / keep_threshold
  uint64_t seed;
  uint32_t offset;
};

// The rule above for a dropout probability p in [0, 1).
inline AttentionDropout make_attention_dropout(double p, uint64_t seed, uint32_t offset) {
  AttentionDropout d{};
  d.enabled = p > 0.0;
  const double t = std::nearbyint((1.0 - p) * 256.0);
  d.keep_threshold = t < 1.0 ? 1u : t > 256.0 ? 256u : static_cast<uint32_t>(t);
  d.keep_scale = 256.0f / static_cast<float>(d.keep_threshold);
  d.seed = seed;
  d.offset = offset;
  return d;
}

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
  const float* delta;             // [heads, total], rowsum(dout * out) in fp32 (attention_bwd_delta)
  float* dq_accum;                // [total + kAttentionBlockM, heads, head_dim] fp32, zeroed by the caller: the
                                  // kernel adds (exact zeros) to the rows past a sequence's end unguarded
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

// The backward's preprocessing (attention_delta_kernel.cu): delta[h, t] = sum_d dout[t, h, d] *
// out[t, h, d] in fp32, [heads, total_tokens]. dout and out: unit stride along head_dim, row and
// head strides multiples of 8 elements, 16-byte aligned.
constexpr int kAttentionDeltaThreads = 256;
struct AttentionDeltaParams {
  const void* dout;
  const void* out;
  int64_t dout_row_stride, dout_head_stride;  // in elements
  int64_t out_row_stride, out_head_stride;
  float* delta;                               // [heads, total_tokens]
  int64_t total_tokens;
  int heads, head_dim;                        // head_dim 32, 64 or 128
  DType dtype;                                // kFloat16 or kBFloat16
  cudaStream_t stream;
};

cudaError_t attention_fwd(const AttentionFwdParams& p);
cudaError_t attention_bwd_delta(const AttentionDeltaParams& p);
cudaError_t attention_bwd(const AttentionBwdParams& p);
cudaError_t attention_dropout_mask(const AttentionDropoutMaskParams& p);

}  // namespace fastbert
