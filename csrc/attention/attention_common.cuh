// Shared by the attention kernels (attention_fwd_kernel.cu, attention_bwd_kernel.cu,
// attention_dropout_mask_kernel.cu): Philox, the element types, the mma fragment loads and the
// launch helpers. CUDA headers only; everything here has internal linkage per file.
//
// Flash-style attention (FlashAttention-2 schedule) for packed variable-length sequences.
//
// Forward (attention_fwd_kernel.cu, its own header comment): one CTA per (64-query tile, head,
// sequence), 4 warps of 16 query rows, key tiles double-buffered with cp.async, fragments read
// with ldmatrix, S = Q K^T and O += P V with mma.sync m16n8k16 (fp32 accumulate), online softmax
// in fp32 registers. Scores never reach global memory; the logsumexp of each row is saved for
// the backward.
//
// Backward (attention_bwd_kernel.cu, its own header comment): one CTA per (64-key tile, head,
// sequence), 4 warps of 16 keys walking the query tiles (Q double-buffered with cp.async),
// fragments read with ldmatrix, S^T and dP^T in registers as the A operands of dV and dK, dS
// through shared memory for dQ (fp32 reductions); delta = rowsum(dO * O) comes from
// attention_delta_kernel.cu.
//
// mma.m16n8k16 fragment layouts (g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8): b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16x8 fp32): c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// The C layout of two adjacent n8 tiles is the A layout of one k16 step, so P (and dS) feed the
// next mma from registers.
#pragma once
#include "attention/attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_utils.cuh"
#include "philox.cuh"

namespace fastbert {
namespace {

constexpr int kThreads = kAttentionThreads;  // attention.h: 4 warps
constexpr int kBlockM = kAttentionBlockM;    // query rows per tile (4 warps x 16)
constexpr int kBlockN = kAttentionBlockN;    // keys per tile
constexpr float kLog2e = 1.4426950408889634f;

// ----------------------------------------------------------------------------- dropout (attention.h's rule)

// The Philox words of `lane` in the 16 x 32 dropout block whose first query is packed token row0
// (cu + 16 * ib) and whose first key is key0 (32 * jb): its 16 elements, byte 4 * f + e being
// element e of the block's n8 fragment f.
__device__ __forceinline__ uint4 dropout_words(const AttentionDropout& d, int64_t row0, int head, int key0, int lane) {
  return philox4x32_10(make_uint4(static_cast<uint32_t>(key0 + lane), static_cast<uint32_t>(row0),
                                  static_cast<uint32_t>(head), d.offset),
                       philox_key(d.seed));
}

__device__ __forceinline__ uint32_t pick(const uint4& r, int i) {
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}

// Whether byte `byte` (0..15) of w keeps its element.
__device__ __forceinline__ bool dropout_keep_byte(const uint4& w, int byte, uint32_t keep_threshold) {
  return ((pick(w, byte >> 2) >> (8 * (byte & 3))) & 0xffu) < keep_threshold;
}

// The keep decision of one element (query i, key j: positions in the sequence starting at packed
// token cu), one Philox call: for code that does not hold a whole block in the forward's layout.
__device__ __forceinline__ bool dropout_keep(const AttentionDropout& d, int64_t cu, int head, int i, int j) {
  const int r = i & 15, c = j & 31;
  const int lane = (r & 7) * 4 + (c & 7) / 2;
  const int byte = (c >> 3) * 4 + (r >> 3) * 2 + (c & 1);
  return dropout_keep_byte(dropout_words(d, cu + (i & ~15), head, j & ~31, lane), byte, d.keep_threshold);
}

// ----------------------------------------------------------------------------- element types

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x (lower 16 bits) = lo
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_f16(d, a, b0, b1);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_bf16(d, a, b0, b1);
  }
};

// ----------------------------------------------------------------------------- launch helpers

template <typename Kernel>
cudaError_t set_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <template <typename, int> class Launch, typename Params>
cudaError_t dispatch(const Params& p) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.dtype != DType::kFloat16 && !bf16) return cudaErrorInvalidValue;
  switch (p.head_dim) {
    case 32: return bf16 ? Launch<__nv_bfloat16, 32>::run(p) : Launch<__half, 32>::run(p);
    case 64: return bf16 ? Launch<__nv_bfloat16, 64>::run(p) : Launch<__half, 64>::run(p);
    case 128: return bf16 ? Launch<__nv_bfloat16, 128>::run(p) : Launch<__half, 128>::run(p);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace fastbert
