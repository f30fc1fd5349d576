// Flash-style attention (FlashAttention-2 schedule) for packed variable-length sequences.
//
// Forward: one CTA per (64-query tile, head, sequence), 4 warps, each warp owns 16 query rows.
// The CTA walks the sequence's keys in tiles of 64: K and V^T go to shared memory, S = Q K^T
// with mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate), online softmax in fp32 registers,
// O += P V with P taken straight from the S accumulators. Scores never reach global memory;
// the logsumexp of each row is saved for the backward.
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
// Rows are padded by 8 elements so the 32 lanes of a fragment load hit distinct banks.
#include "attention/attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_utils.cuh"

namespace fastbert {
namespace {

constexpr int kThreads = kAttentionThreads;  // attention.h: 4 warps
constexpr int kBlockM = kAttentionBlockM;    // query rows per tile (4 warps x 16)
constexpr int kBlockN = kAttentionBlockN;    // keys per tile
constexpr int kLdT = kAttentionLdT;          // row length of the transposed tiles ([head_dim][64 tokens])
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ----------------------------------------------------------------------------- Philox4x32-10

__host__ __device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
#ifdef __CUDA_ARCH__
    const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), hi1 = __umulhi(0xCD9E8D57u, c.z);
#else
    const uint32_t hi0 = static_cast<uint32_t>((uint64_t(0xD2511F53u) * c.x) >> 32);
    const uint32_t hi1 = static_cast<uint32_t>((uint64_t(0xCD9E8D57u) * c.z) >> 32);
#endif
    const uint32_t lo0 = 0xD2511F53u * c.x, lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}

// The four random words covering keys 4*(key/4) .. 4*(key/4)+3 of (token, head).
__device__ __forceinline__ uint4 dropout_bits(const AttentionDropout& d, int64_t token, int head, int key) {
  return philox4x32_10(
      make_uint4(static_cast<uint32_t>(key) >> 2, static_cast<uint32_t>(token), static_cast<uint32_t>(head), d.offset),
      make_uint2(static_cast<uint32_t>(d.seed), static_cast<uint32_t>(d.seed >> 32)));
}

__device__ __forceinline__ uint32_t pick(const uint4& r, int i) {
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
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

// ----------------------------------------------------------------------------- forward

template <typename T, int D>
constexpr size_t fwd_smem_bytes() {
  return attention_fwd_smem_bytes(D, sizeof(T));  // attention.h
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionFwdParams p) {
  constexpr int kLd = D + 8;
  FASTBERT_DYNAMIC_SHARED(unsigned char, smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [kBlockM][kLd]
  T* sK = sQ + kBlockM * kLd;          // [kBlockN][kLd]
  T* sVt = sK + kBlockN * kLd;         // [D][kLdT]

  const int b = blockIdx.z, head = blockIdx.y, m0 = blockIdx.x * kBlockM;
  const int start = p.cu_seqlens[b];
  const int len = p.cu_seqlens[b + 1] - start;
  if (m0 >= len) return;  // uniform over the CTA, before any barrier

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const T* q = static_cast<const T*>(p.q) + (start + m0) * p.q_row_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + start * p.k_row_stride + head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + start * p.v_row_stride + head * p.v_head_stride;

  load_tile<T, D, kBlockM>(q, p.q_row_stride, len - m0, sQ, kLd, nullptr);
  __syncthreads();
  uint32_t qa[D / 16][4];  // this warp's 16 query rows, kept in registers for the whole loop
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(qa[kk], sQ + warp * 16 * kLd, kLd, kk * 16, lane);

  const int row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};  // query positions in the sequence
  const float scale_log2 = p.scale * kLog2e;
  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY};  // running max of scale*log2(e)*s, per row
  float l[2] = {0.f, 0.f};              // running sum (this thread's columns only)

  for (int n0 = 0; n0 < len; n0 += kBlockN) {
    __syncthreads();  // every warp is done with the previous sK / sVt
    load_tile<T, D, kBlockN>(k + n0 * p.k_row_stride, p.k_row_stride, len - n0, sK, kLd, nullptr);
    load_tile<T, D, kBlockN>(v + n0 * p.v_row_stride, p.v_row_stride, len - n0, nullptr, 0, sVt);
    __syncthreads();

    float s[kBlockN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        uint32_t b0, b1;
        load_b(b0, b1, sK, kLd, nt * 8, kk * 16, lane);
        Elem<T>::mma(s[nt], qa[kk], b0, b1);
      }
    }

    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + nt * 8 + 2 * t + (e & 1);
        const float x = col < len ? s[nt][e] * scale_log2 : -INFINITY;
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row with nothing yet: no NaN from -inf - -inf
      const float corr = exp2f(m[r] - base[r]);     // 0 when m was -inf
      m[r] = mx[r];
      l[r] *= corr;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        o[nt][2 * r] *= corr;
        o[nt][2 * r + 1] *= corr;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - base[e >> 1]);  // masked columns: exp2(-inf) = 0
        l[e >> 1] += s[nt][e];
      }
    }
    if (p.dropout.enabled) {  // after the row sums: dropout acts on the normalized probabilities
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        const int col = n0 + nt * 8 + 2 * t;  // even, so col and col + 1 share one Philox call
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint4 bits = dropout_bits(p.dropout, static_cast<int64_t>(start) + row[r], head, col);
          if (pick(bits, col & 3) >= p.dropout.keep_threshold) s[nt][2 * r] = 0.f;
          if (pick(bits, (col & 3) + 1) >= p.dropout.keep_threshold) s[nt][2 * r + 1] = 0.f;
        }
      }
    }
    warp_gemm_reg_a<T, kBlockN, D>(o, s, sVt, kLdT, lane);
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if (row[r] >= len) continue;
    const int64_t token = static_cast<int64_t>(start) + row[r];
    const float inv = l[r] > 0.f ? (p.dropout.enabled ? p.dropout.keep_scale : 1.f) / l[r] : 0.f;
    T* orow = out + (token * p.heads + head) * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
      *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * t) = Elem<T>::pack(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    if (t == 0) p.lse[head * p.total_tokens + token] = l[r] > 0.f ? m[r] * kLn2 + logf(l[r]) : INFINITY;
  }
}

// ----------------------------------------------------------------------------- backward

template <typename T, int D>
constexpr size_t bwd_smem_bytes() {
  return attention_bwd_smem_bytes(D, sizeof(T));  // attention.h: sK, sV, sQ, sdO, sKt, sQt, sdOt, sdS, lse, delta
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(const AttentionBwdParams p) {
  static_assert(kBlockM == 64 && kBlockN == 64, "the transposed tiles are 64 tokens wide");
  constexpr int kLd = D + 8;
  FASTBERT_DYNAMIC_SHARED(unsigned char, smem);
  T* sK = reinterpret_cast<T*>(smem);  // [kBlockN][kLd]   K[key][d]
  T* sV = sK + kBlockN * kLd;          // [kBlockN][kLd]   V[key][d]
  T* sKt = sV + kBlockN * kLd;         // [D][kLdT]        K[key][d] at sKt[d][key]
  T* sQ = sKt + D * kLdT;              // [kBlockM][kLd]
  T* sQt = sQ + kBlockM * kLd;         // [D][kLdT]
  T* sdO = sQt + D * kLdT;             // [kBlockM][kLd]
  T* sdOt = sdO + kBlockM * kLd;       // [D][kLdT]
  T* sdS = sdOt + D * kLdT;            // [kBlockM][kLdT]  dS[query][key]
  float* sLse = reinterpret_cast<float*>(sdS + kBlockM * kLdT);  // [kBlockM], times log2(e)
  float* sDelta = sLse + kBlockM;                                // [kBlockM]

  const int b = blockIdx.z, head = blockIdx.y, n0 = blockIdx.x * kBlockN;
  const int start = p.cu_seqlens[b];
  const int len = p.cu_seqlens[b + 1] - start;
  if (n0 >= len) return;  // uniform over the CTA

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const T* q = static_cast<const T*>(p.q) + start * p.q_row_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + (start + n0) * p.k_row_stride + head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + (start + n0) * p.v_row_stride + head * p.v_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + (static_cast<int64_t>(start) * p.heads + head) * D;
  const int64_t dout_row_stride = static_cast<int64_t>(p.heads) * D;

  load_tile<T, D, kBlockN>(k, p.k_row_stride, len - n0, sK, kLd, sKt);
  load_tile<T, D, kBlockN>(v, p.v_row_stride, len - n0, sV, kLd, nullptr);

  const int key[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};  // this thread's key positions
  const float scale_log2 = p.scale * kLog2e;
  float dk[D / 8][4] = {};
  float dv[D / 8][4] = {};

  for (int m0 = 0; m0 < len; m0 += kBlockM) {
    __syncthreads();  // previous iteration done with sQ, sQt, sdO, sdOt, sdS, sLse, sDelta
    load_tile<T, D, kBlockM>(q + m0 * p.q_row_stride, p.q_row_stride, len - m0, sQ, kLd, sQt);
    load_tile<T, D, kBlockM>(dout + m0 * dout_row_stride, dout_row_stride, len - m0, sdO, kLd, sdOt);
    for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
      const bool valid = m0 + i < len;
      const int64_t at = head * p.total_tokens + start + m0 + i;
      sLse[i] = valid ? p.lse[at] * kLog2e : INFINITY;  // +inf: P = 0 for rows past the end
      sDelta[i] = valid ? p.delta[at] : 0.f;
    }
    __syncthreads();

    // Dropout's keep bits of this thread's 32 elements of the tile (bit 4 * (column / 8) + e for
    // C fragment element e), before the products: Philox's temporaries then never share the
    // registers with their operands.
    uint32_t keep = ~0u;
    if (p.dropout.enabled) {
      keep = 0u;
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qc = j * 8 + 2 * t + (e & 1);
          const int kr = key[e >> 1];
          const uint4 bits = dropout_bits(p.dropout, static_cast<int64_t>(start) + m0 + qc, head, kr);
          keep |= static_cast<uint32_t>(pick(bits, kr & 3) < p.dropout.keep_threshold) << (4 * j + e);
        }
      }
    }
    // P^T after dropout (kept values scaled by 1/(1-p)) and dS^T, as the A fragments (in T) of
    // the dV and dK products: half the registers of their fp32 values.
    uint32_t pd_a[kBlockM / 16][4], ds_a[kBlockM / 16][4];
    // S^T = K Q^T and dPd^T = V dO^T: rows = this warp's 16 keys, columns = the 64 queries.
    float pt[kBlockM / 8][4] = {};
    warp_gemm<T, D, kBlockM>(pt, sK + warp * 16 * kLd, kLd, sQ, kLd, lane);
    float ds[kBlockM / 8][4] = {};
    warp_gemm<T, D, kBlockM>(ds, sV + warp * 16 * kLd, kLd, sdO, kLd, lane);
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j) {
      float pd[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = 8 * j + 2 * t + (e & 1);
        const float prob = key[e >> 1] < len ? exp2f(pt[j][e] * scale_log2 - sLse[qc]) : 0.f;
        float kept = prob;
        if (p.dropout.enabled) kept = (keep >> (4 * j + e)) & 1u ? prob * p.dropout.keep_scale : 0.f;
        pd[e] = kept;
        // dS^T = P^T * (dPd^T * z - delta) = Pd^T * dPd^T - P^T * delta   (z = dropout keep / (1-p))
        ds[j][e] = kept * ds[j][e] - prob * sDelta[qc];
      }
      // C fragment j (columns 8j .. 8j + 7) is half of A fragment j / 2 (the layouts, top of the file)
      pd_a[j / 2][2 * (j & 1)] = Elem<T>::pack(pd[0], pd[1]);
      pd_a[j / 2][2 * (j & 1) + 1] = Elem<T>::pack(pd[2], pd[3]);
      ds_a[j / 2][2 * (j & 1)] = Elem<T>::pack(ds[j][0], ds[j][1]);
      ds_a[j / 2][2 * (j & 1) + 1] = Elem<T>::pack(ds[j][2], ds[j][3]);
    }
    // dV += Pd^T dO
    warp_gemm_frag_a<T, kBlockM, D>(dv, pd_a, sdOt, kLdT, lane);
    // dK += dS^T Q   (times scale at the end)
    warp_gemm_frag_a<T, kBlockM, D>(dk, ds_a, sQt, kLdT, lane);
    // dS to shared memory, query-major, for dQ = dS K (the T values of ds_a)
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = nt * 8 + 2 * t + (e & 1);
        const uint32_t pair = ds_a[nt / 2][2 * (nt & 1) + (e >> 1)];
        sdS[qc * kLdT + warp * 16 + g + 8 * (e >> 1)] = reinterpret_cast<const T*>(&pair)[e & 1];
      }
    }
    __syncthreads();
    // dQ[warp's 16 queries] += scale * dS K, accumulated across key tiles with fp32 atomics
    float dq[D / 8][4] = {};
    warp_gemm<T, kBlockN, D>(dq, sdS + warp * 16 * kLdT, kLdT, sKt, kLdT, lane);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qi = m0 + warp * 16 + g + 8 * r;
      if (qi >= len) continue;
      float* acc = p.dq_accum + ((static_cast<int64_t>(start) + qi) * p.heads + head) * D;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        atomicAdd(acc + nt * 8 + 2 * t, dq[nt][2 * r] * p.scale);
        atomicAdd(acc + nt * 8 + 2 * t + 1, dq[nt][2 * r + 1] * p.scale);
      }
    }
  }

  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= len) continue;
    const int64_t at = ((static_cast<int64_t>(start) + key[r]) * p.heads + head) * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(dk_out + at + nt * 8 + 2 * t) =
          Elem<T>::pack(dk[nt][2 * r] * p.scale, dk[nt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + at + nt * 8 + 2 * t) = Elem<T>::pack(dv[nt][2 * r], dv[nt][2 * r + 1]);
    }
  }
}

// ----------------------------------------------------------------------------- dropout mask

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
      keep = !p.dropout.enabled ||
             pick(dropout_bits(p.dropout, static_cast<int64_t>(start) + i, h, j), j & 3) < p.dropout.keep_threshold;
    }
    p.keep[idx] = keep;
  }
}

// ----------------------------------------------------------------------------- launchers

template <typename Kernel>
cudaError_t set_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int D>
cudaError_t launch_fwd(const AttentionFwdParams& p) {
  constexpr size_t smem = fwd_smem_bytes<T, D>();
  cudaError_t err = set_smem(attention_fwd_kernel<T, D>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_seqlen, kBlockM)), p.heads, p.batch);
  FASTBERT_LAUNCH(grid, kThreads, smem, p.stream, attention_fwd_kernel<T, D>)(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_bwd(const AttentionBwdParams& p) {
  constexpr size_t smem = bwd_smem_bytes<T, D>();
  cudaError_t err = set_smem(attention_bwd_kernel<T, D>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_seqlen, kBlockN)), p.heads, p.batch);
  FASTBERT_LAUNCH(grid, kThreads, smem, p.stream, attention_bwd_kernel<T, D>)(p);
  return cudaGetLastError();
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

template <typename T, int D>
struct FwdLauncher {
  static cudaError_t run(const AttentionFwdParams& p) { return launch_fwd<T, D>(p); }
};
template <typename T, int D>
struct BwdLauncher {
  static cudaError_t run(const AttentionBwdParams& p) { return launch_bwd<T, D>(p); }
};

}  // namespace

cudaError_t attention_fwd(const AttentionFwdParams& p) {
  if (p.batch == 0 || p.heads == 0 || p.max_seqlen == 0 || p.total_tokens == 0) return cudaSuccess;
  return dispatch<FwdLauncher>(p);
}

cudaError_t attention_bwd(const AttentionBwdParams& p) {
  if (p.batch == 0 || p.heads == 0 || p.max_seqlen == 0 || p.total_tokens == 0) return cudaSuccess;
  return dispatch<BwdLauncher>(p);
}

cudaError_t attention_dropout_mask(const AttentionDropoutMaskParams& p) {
  const int64_t n = static_cast<int64_t>(p.batch) * p.heads * p.max_seqlen * p.max_seqlen;
  if (n == 0) return cudaSuccess;
  FASTBERT_LAUNCH(grid_size(n, 256), 256, 0, p.stream, attention_dropout_mask_kernel)(p);
  return cudaGetLastError();
}

}  // namespace fastbert
