// Attention backward: see attention_common.cuh for the schedule and the fragment layouts.
#include "attention/attention_common.cuh"

namespace fastbert {
namespace {

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
          keep |= static_cast<uint32_t>(dropout_keep(p.dropout, start, head, m0 + qc, key[e >> 1])) << (4 * j + e);
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

template <typename T, int D>
cudaError_t launch_bwd(const AttentionBwdParams& p) {
  constexpr size_t smem = bwd_smem_bytes<T, D>();
  cudaError_t err = set_smem(attention_bwd_kernel<T, D>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_seqlen, kBlockN)), p.heads, p.batch);
  FASTBERT_LAUNCH(grid, kThreads, smem, p.stream, attention_bwd_kernel<T, D>)(p);
  return cudaGetLastError();
}


template <typename T, int D>
struct BwdLauncher {
  static cudaError_t run(const AttentionBwdParams& p) { return launch_bwd<T, D>(p); }
};


}  // namespace

cudaError_t attention_bwd(const AttentionBwdParams& p) {
  if (p.batch == 0 || p.heads == 0 || p.max_seqlen == 0 || p.total_tokens == 0) return cudaSuccess;
  return dispatch<BwdLauncher>(p);
}

}  // namespace fastbert
