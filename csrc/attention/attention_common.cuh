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
// Backward: rowsum(dO * O) comes precomputed (delta). One CTA per (64-key tile, head, sequence),
// each warp owns 16 keys and walks the query tiles: S^T = K Q^T, P^T = exp(S^T - lse), dV +=
// P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q, and dQ += dS K goes to an fp32
// buffer with atomicAdd (the caller converts it).
//
// mma operands are read from shared memory with 32-bit loads in the m16n8k16 fragment layout
// (g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16x8), stored n-major as Bt[n][k]: b0 = Bt[g][2t..2t+1], b1 = Bt[g][2t+8..]
//   C (16x8 fp32): c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
// so every operand lives in shared memory "k-contiguous"; tiles needed the other way round
// (V^T, Q^T, dO^T, K^T) are written transposed when loaded. The C layout of two adjacent n8
// tiles is the A layout of one k16 step, so P (and dS) feed the next mma from registers.
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
constexpr int kLdT = kAttentionLdT;          // row length of the transposed tiles ([head_dim][64 tokens])
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

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

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// A fragment of rows [0, 16) of `a` (row-major, leading dimension ld), columns [k0, k0 + 16).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* base, int ld, int k0, int lane) {
  const T* r0 = base + (lane >> 2) * ld + k0 + 2 * (lane & 3);
  const T* r1 = r0 + 8 * ld;
  a[0] = ld32(r0);
  a[1] = ld32(r1);
  a[2] = ld32(r0 + 8);
  a[3] = ld32(r1 + 8);
}

// B fragment (k in [k0, k0 + 16), n in [n0, n0 + 8)) of a B stored transposed: bt[n][k].
template <typename T>
__device__ __forceinline__ void load_b(uint32_t& b0, uint32_t& b1, const T* bt, int ld, int n0, int k0, int lane) {
  const T* r = bt + (n0 + (lane >> 2)) * ld + k0 + 2 * (lane & 3);
  b0 = ld32(r);
  b1 = ld32(r + 8);
}

// C fragments acc[N/8] of a 16xN tile: A = rows of `a` (16 x K), B stored as bt[n][k].
template <typename T, int K, int N>
__device__ __forceinline__ void warp_gemm(float (&acc)[N / 8][4], const T* a, int lda, const T* bt, int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t af[4];
    load_a(af, a, lda, kk * 16, lane);
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      uint32_t b0, b1;
      load_b(b0, b1, bt, ldb, nt * 8, kk * 16, lane);
      Elem<T>::mma(acc[nt], af, b0, b1);
    }
  }
}

// The A fragments (16 x K, converted to T) of C fragments c[K/8] of a 16xK fp32 tile.
template <typename T, int K>
__device__ __forceinline__ void pack_a(uint32_t (&a)[K / 16][4], const float (&c)[K / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    a[kk][0] = Elem<T>::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = Elem<T>::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = Elem<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = Elem<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// acc[N/8] += A (16 x K, held as A fragments a[K/16]) times B (bt[n][k]).
template <typename T, int K, int N>
__device__ __forceinline__ void warp_gemm_frag_a(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4], const T* bt,
                                                 int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int nt = 0; nt < N / 8; ++nt) {
      uint32_t b0, b1;
      load_b(b0, b1, bt, ldb, nt * 8, kk * 16, lane);
      Elem<T>::mma(acc[nt], a[kk], b0, b1);
    }
  }
}

// acc[N/8] += C (16 x K, held as C fragments c[K/8], converted to T) times B (bt[n][k]).
template <typename T, int K, int N>
__device__ __forceinline__ void warp_gemm_reg_a(float (&acc)[N / 8][4], const float (&c)[K / 8][4], const T* bt,
                                                int ldb, int lane) {
  uint32_t a[K / 16][4];
  pack_a<T, K>(a, c);
  warp_gemm_frag_a<T, K, N>(acc, a, bt, ldb, lane);
}

// Rows [0, R) of a token tile (src points at its first row for one head; row r at src + r *
// row_stride) to shared memory: dst[r][0..D) (leading dim ld) and/or dst_t[d][r] (leading dim
// kLdT). Rows r >= valid are zero, so masked keys/queries hold finite values. 16-byte loads.
template <typename T, int D, int R>
__device__ __forceinline__ void load_tile(const T* src, int64_t row_stride, int valid, T* dst, int ld, T* dst_t) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < R * kChunks; c += kThreads) {
    const int r = c / kChunks, d = (c % kChunks) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) val = *reinterpret_cast<const uint4*>(src + r * row_stride + d);
    if (dst != nullptr) *reinterpret_cast<uint4*>(dst + r * ld + d) = val;
    if (dst_t != nullptr) {
      const T* e = reinterpret_cast<const T*>(&val);
#pragma unroll
      for (int i = 0; i < 8; ++i) dst_t[(d + i) * kLdT + r] = e[i];
    }
  }
}

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
