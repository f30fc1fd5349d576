// Attention forward: see attention_common.cuh for the schedule and the fragment layouts.
#include "attention/attention_common.cuh"

namespace fastbert {
namespace {

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
      // one Philox call per 16 x 32 block: fragment nt's element e is byte 4 * (nt % 4) + e
#pragma unroll
      for (int q4 = 0; q4 < kBlockN / 32; ++q4) {
        const uint4 w = dropout_words(p.dropout, static_cast<int64_t>(start) + m0 + warp * 16, head, n0 + 32 * q4, lane);
#pragma unroll
        for (int f = 0; f < 4; ++f) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!dropout_keep_byte(w, 4 * f + e, p.dropout.keep_threshold)) s[4 * q4 + f][e] = 0.f;
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
struct FwdLauncher {
  static cudaError_t run(const AttentionFwdParams& p) { return launch_fwd<T, D>(p); }
};

}  // namespace

cudaError_t attention_fwd(const AttentionFwdParams& p) {
  if (p.batch == 0 || p.heads == 0 || p.max_seqlen == 0 || p.total_tokens == 0) return cudaSuccess;
  return dispatch<FwdLauncher>(p);
}

}  // namespace fastbert
