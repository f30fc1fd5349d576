// Attention forward (FlashAttention-2's schedule; issue 11's instruction budget).
//
// One CTA per (64-query tile, head, sequence), 4 warps, each warp owns 16 query rows. The CTA
// walks the sequence's keys in tiles of kBlockN (attention.h: attention_fwd_block_n):
// - K and V tiles are copied global -> shared with cp.async into two buffers: while the warps
//   compute on one tile, the next is in flight (one barrier per tile). Rows are padded to
//   head_dim + 8 elements, so the 8 rows each ldmatrix phase reads sit in distinct banks.
// - Fragments come from ldmatrix: K with .x4 (B operand of S = Q K^T, k-contiguous as stored),
//   V with .x4.trans (B operand of O += P V), so no transposed copy exists anywhere. Q's
//   fragments are read once and stay in registers; P goes from the S accumulators to the A
//   operand of P V in registers.
// - Online softmax in fp32 with exp2: p = 2^(s * scale * log2(e) - m * scale * log2(e)), one
//   FFMA and one MUFU.EX2 per element; the running max is kept on the raw scores (the sign of
//   a negative scale is moved into Q, exactly, so the max of the raw scores is the max).
// - Full key tiles take a path without any per-element predicate; only the last, partial tile
//   of a sequence is masked (a separate copy of the tile step, visited first, before the main loop).
// - Addresses are computed once per thread: every cp.async and ldmatrix of an iteration is a
//   register base plus an immediate offset.
#include <cfloat>

#include "attention/attention_common.cuh"

namespace fastbert {
namespace {

template <typename T, int D>
struct FwdTile {
  static constexpr int kBlockM = kAttentionFwdBlockM;         // 64 query rows, 16 per warp
  static constexpr int kBlockN = attention_fwd_block_n(D);     // keys per iteration
  static constexpr int kLd = D + 8;                            // padded row, elements
  static constexpr int kChunks = D / 8;                        // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;      // rows one pass of the CTA copies
  static constexpr int kKvPasses = kBlockN / kRowsPerPass;     // 16-byte copies per thread per tile
  static constexpr int kQPasses = kBlockM / kRowsPerPass;
  static constexpr int kTileElems = kBlockN * kLd;             // one K or V buffer
  static_assert(kThreads % kChunks == 0 && kBlockN % kRowsPerPass == 0 && kBlockM % kRowsPerPass == 0, "");
};

template <typename T, int D>
constexpr size_t fwd_smem_bytes() {
  return attention_fwd_smem_bytes(D, sizeof(T));  // attention.h
}

// Rows [0, kPasses * kRowsPerPass) of a token tile to shared memory, thread by thread: this
// thread copies the 16-byte chunk at `src` (row r0 = tid / kChunks, its column) and the rows
// kRowsPerPass, 2 kRowsPerPass, ... below it; `row_step` = kRowsPerPass * row stride. With
// kFull every row is valid (no predicate); else `valid` is the tile's valid rows minus r0 and
// the rows past them are zero-filled with plain stores, so masked keys and padded queries hold
// finite values (a dropped-out or masked probability times a NaN would still be a NaN).
template <typename T, int D, int kPasses, bool kFull>
__device__ __forceinline__ void copy_rows(T* dst, const T* src, int64_t row_step, int valid) {
  using Tile = FwdTile<T, D>;
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    T* d = dst + i * Tile::kRowsPerPass * Tile::kLd;
    if (kFull || i * Tile::kRowsPerPass < valid) cp_async_16(d, src + i * row_step);
    else *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// One key tile: S = Q K^T (16 x kBlockN per warp), online softmax, dropout, O += P V. With
// kMask, keys >= valid (the tile's valid keys) get probability 0; without, every key counts.
// n0: the tile's first key; row_blk: the packed token of the warp's first query row.
template <typename T, int D, bool kMask>
__device__ __forceinline__ void tile_step(const AttentionFwdParams& p, const uint32_t (&qa)[D / 16][4], const T* sK,
                                          const T* sV, float (&o)[D / 8][4], float (&m)[2], float (&l)[2],
                                          float scale_log2, int valid, int n0, int64_t row_blk, int head, int lane) {
  using Tile = FwdTile<T, D>;
  constexpr int N = Tile::kBlockN;
  const int t = lane & 3;
  float s[N / 8][4];
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];  // keys 16 np .. +15, dims 16 kk .. +15: b0, b1 of n-tile 2 np, then of 2 np + 1
      ldmatrix_x4(b, sK + np * 16 * Tile::kLd + kk * 16);
      Elem<T>::mma(s[2 * np], qa[kk], b[0], b[1]);
      Elem<T>::mma(s[2 * np + 1], qa[kk], b[2], b[3]);
    }
  }

  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (kMask && nt * 8 + 2 * t + (e & 1) >= valid) s[nt][e] = -INFINITY;
      mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
    }
  }
  float ms[2];  // the new running max, times scale * log2(e)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    ms[r] = mx[r] * scale_log2;
    const float corr = exp2_approx(fmaf(m[r], scale_log2, -ms[r]));  // m = -FLT_MAX at first: 0
    m[r] = mx[r];
    l[r] *= corr;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      o[nt][2 * r] *= corr;
      o[nt][2 * r + 1] *= corr;
    }
  }
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = exp2_approx(fmaf(s[nt][e], scale_log2, -ms[e >> 1]));
      if (kMask && nt * 8 + 2 * t + (e & 1) >= valid) x = 0.f;  // also when scale is 0 (-inf * 0)
      s[nt][e] = x;
      l[e >> 1] += x;
    }
  }
  if (p.dropout.enabled) {  // after the row sums: dropout acts on the normalized probabilities
    // attention.h's rule: one Philox call per 16 x 32 block, whose counter's first word is the
    // block's first key + lane; n8 fragment nt's element e is byte e of word nt % 4. Byte e is kept
    // iff it is < keep_threshold, i.e. iff the word shifted left by 24 - 8 e (the byte on top,
    // lower bytes below it) is <= (keep_threshold << 24) - 1 (all ones for 256: keep all).
    const uint32_t top = (p.dropout.keep_threshold << 24) - 1u;
#pragma unroll
    for (int q4 = 0; q4 < N / 32; ++q4) {
      const uint4 w = dropout_words(p.dropout, row_blk, head, n0 + 32 * q4, lane);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if ((pick(w, f) << (24 - 8 * e)) > top) s[4 * q4 + f][e] = 0.f;
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    uint32_t a[4];
    a[0] = Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
    a[1] = Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
    a[2] = Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];  // keys 16 kk .. +15, dims 16 dp .. +15 (transposed): b0, b1 of d-tile 2 dp, then 2 dp + 1
      ldmatrix_x4_trans(b, sV + kk * 16 * Tile::kLd + dp * 16);
      Elem<T>::mma(o[2 * dp], a, b[0], b[1]);
      Elem<T>::mma(o[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const AttentionFwdParams p) {
  using Tile = FwdTile<T, D>;
  constexpr int M = Tile::kBlockM, N = Tile::kBlockN, kLd = Tile::kLd;
  FASTBERT_DYNAMIC_SHARED(unsigned char, smem);
  T* sQ = reinterpret_cast<T*>(smem);  // [M][kLd]
  T* sKV = sQ + M * kLd;               // buffer b: K at sKV + 2 b kTileElems, V after it

  const int b = blockIdx.z, head = blockIdx.y, m0 = blockIdx.x * M;
  const int start = p.cu_seqlens[b];
  const int len = p.cu_seqlens[b + 1] - start;
  if (m0 >= len) return;  // uniform over the CTA, before any barrier

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, t = lane & 3;
  // this thread's 16-byte chunk of every copied tile: row r0 (+ multiples of kRowsPerPass), column c0
  const int r0 = tid / Tile::kChunks, c0 = (tid % Tile::kChunks) * 8;
  const T* gq = static_cast<const T*>(p.q) + (start + m0 + r0) * p.q_row_stride + head * p.q_head_stride + c0;
  const T* gk = static_cast<const T*>(p.k) + (start + r0) * p.k_row_stride + head * p.k_head_stride + c0;
  const T* gv = static_cast<const T*>(p.v) + (start + r0) * p.v_row_stride + head * p.v_head_stride + c0;
  const int64_t k_step = Tile::kRowsPerPass * p.k_row_stride, v_step = Tile::kRowsPerPass * p.v_row_stride;
  const int64_t k_tile = N * p.k_row_stride, v_tile = N * p.v_row_stride;
  T* const dst0 = sKV + r0 * kLd + c0;  // this thread's chunk in buffer 0's K; V at + kTileElems

  // The tiles are visited last first (FlashAttention-2's order): the partial tile, if any, comes
  // first and is the only masked one; the main loop then walks full tiles n_full - 1 .. 0, each
  // iteration copying the next one (one tile lower) into the other buffer while it computes.
  const int n_full = len / N, rem = len - n_full * N;
  copy_rows<T, D, Tile::kQPasses, false>(sQ + r0 * kLd + c0, gq, Tile::kRowsPerPass * p.q_row_stride, len - m0 - r0);
  gk += (rem > 0 ? n_full : n_full - 1) * k_tile;  // the first tile visited
  gv += (rem > 0 ? n_full : n_full - 1) * v_tile;
  if (rem > 0) {
    copy_rows<T, D, Tile::kKvPasses, false>(dst0, gk, k_step, rem - r0);
    copy_rows<T, D, Tile::kKvPasses, false>(dst0 + Tile::kTileElems, gv, v_step, rem - r0);
  } else {
    copy_rows<T, D, Tile::kKvPasses, true>(dst0, gk, k_step, N);
    copy_rows<T, D, Tile::kKvPasses, true>(dst0 + Tile::kTileElems, gv, v_step, N);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  // ldmatrix row addresses of this lane (lane l gives row l % 8 of 8x8 matrix l / 8):
  // A (Q rows, dims): rows 8 ((l/8) % 2) + l % 8, dims 8 (l / 16); K (keys, dims) as B: keys
  // 8 (l / 16) + l % 8, dims 8 ((l/8) % 2); V (keys, dims) transposed: keys 8 ((l/8) % 2) + l % 8,
  // dims 8 (l / 16).
  const int lrow = ((lane >> 3) & 1) * 8 + (lane & 7), lcol = (lane >> 4) * 8;
  uint32_t qa[D / 16][4];  // this warp's 16 query rows, kept in registers for the whole loop
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qa[kk], sQ + (warp * 16 + lrow) * kLd + lcol + kk * 16);
  float scale = p.scale;
  if (scale < 0.f) {  // s * scale = (-s) * |scale|: flip the sign bits of Q (exact)
    scale = -scale;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) qa[kk][i] ^= 0x80008000u;
  }
  const float scale_log2 = scale * kLog2e;
  const T* const lk = sKV + ((lane >> 4) * 8 + (lane & 7)) * kLd + ((lane >> 3) & 1) * 8;
  const T* const lv = sKV + Tile::kTileElems + lrow * kLd + lcol;

  const int g = lane >> 2;
  const int64_t row_blk = static_cast<int64_t>(start) + m0 + warp * 16;  // the warp's 16 rows: a dropout block row
  const int64_t token0 = row_blk + g;                                      // row g; row g + 8 is token0 + 8
  float o[D / 8][4] = {};
  float m[2] = {-FLT_MAX, -FLT_MAX};  // running max of the raw scores, per row
  float l[2] = {0.f, 0.f};            // running sum (this thread's columns only)

  constexpr int kOther = 2 * Tile::kTileElems;  // buffer 1's offset from buffer 0
  int buf = 0;                                  // the current tile's buffer offset: 0 or kOther
  if (rem > 0) {
    if (n_full > 0) {  // full tile n_full - 1 into buffer 1 while the partial tile is computed
      gk -= k_tile;
      gv -= v_tile;
      copy_rows<T, D, Tile::kKvPasses, true>(dst0 + kOther, gk, k_step, N);
      copy_rows<T, D, Tile::kKvPasses, true>(dst0 + kOther + Tile::kTileElems, gv, v_step, N);
      cp_async_commit();
    }
    tile_step<T, D, true>(p, qa, lk, lv, o, m, l, scale_log2, rem, n_full * N, row_blk, head, lane);
    buf = kOther;
  }
  for (int j = n_full - 1; j >= 0; --j) {
    cp_async_wait<0>();
    __syncthreads();  // tile j landed for every thread; every warp is done with the other buffer
    if (j > 0) {
      gk -= k_tile;
      gv -= v_tile;
      copy_rows<T, D, Tile::kKvPasses, true>(dst0 + (buf ^ kOther), gk, k_step, N);
      copy_rows<T, D, Tile::kKvPasses, true>(dst0 + (buf ^ kOther) + Tile::kTileElems, gv, v_step, N);
      cp_async_commit();
    }
    tile_step<T, D, false>(p, qa, lk + buf, lv + buf, o, m, l, scale_log2, N, j * N, row_blk, head, lane);
    buf ^= kOther;
  }

  T* out = static_cast<T*>(p.out);
  const int row0 = m0 + warp * 16 + g;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    if (row0 + 8 * r >= len) continue;
    const int64_t token = token0 + 8 * r;
    const float inv = l[r] > 0.f ? (p.dropout.enabled ? p.dropout.keep_scale : 1.f) / l[r] : 0.f;
    T* orow = out + (token * p.heads + head) * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
      *reinterpret_cast<uint32_t*>(orow + nt * 8 + 2 * t) = Elem<T>::pack(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
    if (t == 0) p.lse[head * p.total_tokens + token] = l[r] > 0.f ? m[r] * scale + logf(l[r]) : INFINITY;
  }
}

template <typename T, int D>
cudaError_t launch_fwd(const AttentionFwdParams& p) {
  constexpr size_t smem = fwd_smem_bytes<T, D>();
  cudaError_t err = set_smem(attention_fwd_kernel<T, D>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_seqlen, kAttentionFwdBlockM)), p.heads, p.batch);
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
