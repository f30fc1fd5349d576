// Attention backward (FlashAttention-2's schedule, keys outer). One CTA per (64-key tile, head,
// sequence), 4 warps, each warp owns 16 keys and walks the sequence's query tiles of 64:
//   S^T = K Q^T, P^T = exp2(S^T * scale * log2(e) - lse * log2(e))   (keys as rows)
//   dP^T = V dO^T, dS^T = P^T (dP^T Z - delta)                       (Z: dropout keep * keep_scale)
//   dV += (P Z)^T dO, dK += dS^T Q, dQ += dS K (fp32 reductions into dq_accum)
// In this orientation P^T and dS^T leave the accumulators as the A operands of the dV and dK
// products (the C layout of two n8 fragments is the A layout of one k16 step), so only dS goes
// through shared memory (for dQ). K and V (head_dim <= 64) stay in registers as A fragments.
//
// Memory: Q (double-buffered), dO tiles arrive by cp.async (16 bytes, rows past the sequence
// zero-filled) into rows padded by 16 bytes, so ldmatrix's eight 16-byte rows fall in eight
// distinct bank groups; every operand is read with ldmatrix (.trans for the k-major ones: dO and Q
// as B of dV and dK, K as B of dQ, dS^T as A of dQ), no transposed copies. Q, lse and delta of
// the next tile load during this one; dO's after the mid-iteration barrier.
//
// No per-element masks: rows past the sequence are zero in Q and dO, their lse is +inf (P = 0)
// and their delta 0, so they add nothing; keys past it are zero in K and V and their S rows start
// from -inf in the accumulator (P = 0 whatever lse is). dQ's rows past the end are exact zeros
// (dS = 0 there); they land in the next sequence's rows or the kAttentionBlockM rows dq_accum has
// past the last token, unguarded (as FA2's padded dq_accum).
//
// The scale is folded: exp2's argument is one FFMA; dS carries the softmax scale (delta is
// stored times scale, dP enters through one FFMA), so dK and dQ need no multiply; dV is scaled
// by keep_scale once at the end.
//
// dQ: each thread adds its 2 consecutive columns per n8 fragment; on sm_90 as one
// red.global.add.v2.f32 (16 per thread and tile at head_dim 64, 0.1 per HMMA), on sm_80 (no
// vector float reductions) as two scalar ones (0.2 per HMMA). A separate dQ pass (FA2's
// alternative) would recompute S and dP: 64 more HMMA per warp and tile (+40%), far more than
// the 16 extra reductions.
//
// Dropout (attention.h's rule, one Philox call per 16 elements): the forward's 16 x 32 blocks
// hold queries as rows; a warp pair (2j, 2j + 1) covers one 32-key block. Warp 2j + h computes,
// in the forward's layout, the calls of the query blocks 2h, 2h + 1 of the tile (two per lane)
// and stores their 32 keep bits to shared memory during the previous tile; each lane then
// reads the bits of the two lanes owning its elements in the forward's layout.
#include "attention/attention_common.cuh"

namespace fastbert {
namespace {

template <int D>
struct BwdSmem {
  static constexpr int kLd = D + 8;         // row of sK, sV, sQ, sdO in elements: 16-byte padding
  static constexpr int kLdS = kBlockM + 8;  // row of sdS ([key][query])
  // offsets in elements of T: sK, sV [64][kLd]; sQ [2][64][kLd]; sdO [64][kLd]; sdS [64][kLdS]
  static constexpr int kK = 0, kV = kK + kBlockN * kLd, kQ = kV + kBlockN * kLd, kdO = kQ + 2 * kBlockM * kLd,
                       kdS = kdO + kBlockM * kLd, kEnd = kdS + kBlockN * kLdS;
  // then floats: lse * log2(e) [2][64], delta * scale [2][64], dropout bits [2][2 pairs][32 lanes][2]
  static constexpr size_t kBytes = kEnd * 2 + (2 * 2 * kBlockM + 2 * 2 * 32 * 2) * 4;
};
static_assert(BwdSmem<32>::kBytes == attention_bwd_smem_bytes(32, 2) &&
                  BwdSmem<64>::kBytes == attention_bwd_smem_bytes(64, 2) &&
                  BwdSmem<128>::kBytes == attention_bwd_smem_bytes(128, 2),
              "attention.h's attention_bwd_smem_bytes must match the kernel's layout");

// The 16 keep bits (bit i: byte i of the rule) of one Philox call, four bytes per word at once:
// byte a is kept iff a < threshold, i.e. a <= t = threshold - 1 (0..255). With a7, t7 the low 7
// bits, (t7 | 0x80) - a7 >= 0x80 iff a7 <= t7 (no borrow leaves the byte), and then
// a <= t iff majority(!a_hi, a7 <= t7, t_hi). `lane_t` is t in every byte with the top bits set,
// `hi_t` 0x80808080 iff t >= 128.
__device__ __forceinline__ uint32_t keep_mask16(const uint4& w, uint32_t lane_t, uint32_t hi_t) {
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t a = pick(w, i);
    const uint32_t low_le = lane_t - (a & 0x7f7f7f7fu);
    const uint32_t le = ((~a & low_le) | (~a & hi_t) | (low_le & hi_t)) & 0x80808080u;  // bit 7 of each byte
    // bits 7, 15, 23, 31 to bits 28..31 (the other partial products land below bit 28 or above 31)
    m |= ((le * 0x00204081u) >> 28) << (4 * i);
  }
  return m;
}

// kDropout: p.dropout.enabled, a template flag (as FA2's) so the plain kernel carries no keep tests.
template <typename T, int D, bool kDropout>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(const AttentionBwdParams p) {
  static_assert(kBlockM == 64 && kBlockN == 64 && kThreads == 128, "the layout below is for 64 x 64 tiles, 4 warps");
  using L = BwdSmem<D>;
  constexpr int kLd = L::kLd, kLdS = L::kLdS;
  constexpr bool kKVInRegs = D <= 64;  // head_dim 128: dK and dV alone take 128 registers
  constexpr int kQW = D <= 64 ? kBlockM : kBlockM / 4;  // queries per S, dP, dV, dK step
  FASTBERT_DYNAMIC_SHARED(unsigned char, smem);
  T* const sK = reinterpret_cast<T*>(smem) + L::kK;
  T* const sV = reinterpret_cast<T*>(smem) + L::kV;
  T* const sQ = reinterpret_cast<T*>(smem) + L::kQ;
  T* const sdO = reinterpret_cast<T*>(smem) + L::kdO;
  T* const sdS = reinterpret_cast<T*>(smem) + L::kdS;
  float* const sLse = reinterpret_cast<float*>(reinterpret_cast<T*>(smem) + L::kEnd);
  float* const sDelta = sLse + 2 * kBlockM;
  uint32_t* const sBits = reinterpret_cast<uint32_t*>(sDelta + 2 * kBlockM);

  const int b = blockIdx.z, head = blockIdx.y, n0 = blockIdx.x * kBlockN;
  const int start = p.cu_seqlens[b];
  const int len = p.cu_seqlens[b + 1] - start;
  if (n0 >= len) return;  // uniform over the CTA

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
  const int64_t dout_row_stride = static_cast<int64_t>(p.heads) * D;

  // ---- tile loads: the thread's 16-byte chunks are rows lr + kRowStep * i, columns lc .. lc + 7
  constexpr int kRowStep = kThreads / (D / 8), kSteps = kBlockM / kRowStep;
  const int lr = tid / (D / 8), lc = (tid % (D / 8)) * 8;
  // A row past `valid` reads nothing (cp.async's src-size 0, zero fill) though its source address may
  // lie past the tensor; selecting a valid address instead cost 50 instructions per tile (d = 64).
  auto load_tile = [&](T* dst, const T* src, int64_t row_stride, int valid) {
#pragma unroll
    for (int i = 0; i < kSteps; ++i)
      cp_async_16_zfill(dst + (lr + kRowStep * i) * kLd + lc, src + kRowStep * i * row_stride, lr + kRowStep * i < valid);
  };
  const T* q_src = static_cast<const T*>(p.q) + (static_cast<int64_t>(start) + lr) * p.q_row_stride +
                   head * p.q_head_stride + lc;
  const T* do_src = static_cast<const T*>(p.dout) + (static_cast<int64_t>(start) + lr) * dout_row_stride + head * D + lc;
  const int64_t q_tile_stride = kBlockM * p.q_row_stride, do_tile_stride = kBlockM * dout_row_stride;
  load_tile(sK, static_cast<const T*>(p.k) + (static_cast<int64_t>(start) + n0 + lr) * p.k_row_stride +
                    head * p.k_head_stride + lc, p.k_row_stride, len - n0);
  load_tile(sV, static_cast<const T*>(p.v) + (static_cast<int64_t>(start) + n0 + lr) * p.v_row_stride +
                    head * p.v_head_stride + lc, p.v_row_stride, len - n0);
  load_tile(sQ, q_src, p.q_row_stride, len);
  load_tile(sdO, do_src, dout_row_stride, len);
  cp_async_commit();

  // ---- row statistics: threads 0..63 bring lse * log2(e) (+inf past the end: P = 0), threads
  // 64..127 delta * scale (0 past the end) of query row tid % 64 of a tile
  const int st_row = tid & (kBlockM - 1);
  const bool st_lse = tid < kBlockM;
  const float* st_src = (st_lse ? p.lse : p.delta) + static_cast<int64_t>(head) * p.total_tokens + start + st_row;
  const float st_mul = st_lse ? kLog2e : p.scale, st_past = st_lse ? INFINITY : 0.f;
  float* const st_dst = (st_lse ? sLse : sDelta) + st_row;
  auto load_stat = [&](int m0) { return m0 + st_row < len ? st_src[m0] * st_mul : st_past; };
  st_dst[0] = load_stat(0);

  // ---- dropout bits (see the top of the file): warp 2 * pair + h, query blocks 2h, 2h + 1
  const int pair = warp >> 1, h = warp & 1;
  auto make_bits = [&](int m0, int buf) {
    const uint32_t thr = p.dropout.keep_threshold - 1u;  // keep_threshold is 1..256
    const uint32_t lane_t = thr * 0x01010101u | 0x80808080u, hi_t = thr >= 128u ? 0x80808080u : 0u;
    const int64_t row0 = static_cast<int64_t>(start) + m0 + 32 * h;
    const uint4 w0 = dropout_words(p.dropout, row0, head, n0 + 32 * pair, lane);
    const uint4 w1 = dropout_words(p.dropout, row0 + 16, head, n0 + 32 * pair, lane);
    sBits[((buf * 2 + pair) * 32 + lane) * 2 + h] = keep_mask16(w0, lane_t, hi_t) | keep_mask16(w1, lane_t, hi_t) << 16;
  };
  // this lane's elements (key 16h + g (+8) of the pair's block, query 8 nt + 2t (+1)) are held by
  // forward-layout lanes 8t + g / 2 (query 2t) and 8t + 4 + g / 2 (query 2t + 1)
  const uint32_t* bits_src = sBits + (pair * 32 + 8 * t + (g >> 1)) * 2;
  const uint32_t bits_sel = h | (2 + h) << 4 | (4 + h) << 8 | (6 + h) << 12;  // bytes of the blocks 0..3
  if (kDropout) make_bits(0, 0);

  // ---- ldmatrix lane addresses. X: row (lane % 8) + 8 * (lane / 8 % 2), column 8 * (lane / 16)
  // (A non-transposed; B transposed). Y: row (lane % 8) + 8 * (lane / 16), column 8 * (lane / 8 % 2)
  // (B non-transposed; A transposed).
  const int x_row = (lane & 7) + ((lane >> 3) & 1) * 8, x_col = (lane >> 4) * 8;
  const int y_row = (lane & 7) + (lane >> 4) * 8, y_col = ((lane >> 3) & 1) * 8;
  const T* const kA = sK + (warp * 16 + x_row) * kLd + x_col;  // this warp's keys as A: + 16 kk
  const T* const vA = sV + (warp * 16 + x_row) * kLd + x_col;
  const T* const qB = sQ + y_row * kLd + y_col;                // Q as B of S^T: + 16 np rows + 16 kk
  const T* const doB = sdO + y_row * kLd + y_col;
  const T* const qBt = sQ + x_row * kLd + x_col;               // Q as B of dK: + 16 kk rows + 16 np
  const T* const doBt = sdO + x_row * kLd + x_col;
  const T* const kBt = sK + x_row * kLd + x_col;               // K as B of dQ
  const T* const dsA = sdS + y_row * kLdS + warp * 16 + y_col; // dS (this warp's queries) as A of dQ
  T* const dsW = sdS + (warp * 16 + g) * kLdS + 2 * t;         // dS^T stores

  const float s_init0 = n0 + warp * 16 + g < len ? 0.f : -INFINITY;  // keys past the end: P = 0
  const float s_init1 = n0 + warp * 16 + g + 8 < len ? 0.f : -INFINITY;
  const float scale_log2 = p.scale * kLog2e;
  const float ds_scale = kDropout ? p.scale * p.dropout.keep_scale : p.scale;
  float* dq_dst = p.dq_accum + ((static_cast<int64_t>(start) + warp * 16 + g) * p.heads + head) * D + 2 * t;
  const int64_t dq_row8 = 8 * dout_row_stride, dq_tile_stride = kBlockM * dout_row_stride;

  float dk[D / 8][4] = {};
  float dv[D / 8][4] = {};
  uint32_t kf[kKVInRegs ? D / 16 : 1][4], vf[kKVInRegs ? D / 16 : 1][4];

  cp_async_wait<0>();
  __syncthreads();
  if (kKVInRegs) {
#pragma unroll
    for (int kk = 0; kk < (kKVInRegs ? D / 16 : 0); ++kk) {
      ldmatrix_x4(kf[kk], kA + 16 * kk);
      ldmatrix_x4(vf[kk], vA + 16 * kk);
    }
  }

  int buf = 0;
  for (int m0 = 0; m0 < len; m0 += kBlockM) {
    const bool more = m0 + kBlockM < len;
    const int qoff = buf * kBlockM * kLd, soff = buf * kBlockM;
    // the next tile's Q, lse, delta: their buffers were last read before the previous barrier
    float st_next = 0.f;
    if (more) {
      load_tile(sQ + (buf ^ 1) * kBlockM * kLd, q_src + q_tile_stride, p.q_row_stride, len - m0 - kBlockM);
      cp_async_commit();
      st_next = load_stat(m0 + kBlockM);
    }

    // dropout: keep bits of element (nt, e) at bit 8 (nt / 2) + 4 (e / 2) + 2 (nt % 2) of word e % 2
    uint32_t keep[2] = {~0u, ~0u};
    if (kDropout) {
      const uint2 x0 = *reinterpret_cast<const uint2*>(bits_src + buf * 128);
      const uint2 x1 = *reinterpret_cast<const uint2*>(bits_src + buf * 128 + 8);
      keep[0] = __byte_perm(x0.x, x0.y, bits_sel) >> (g & 1);
      keep[1] = __byte_perm(x1.x, x1.y, bits_sel) >> (g & 1);
    }
    // The tile's queries in chunks of kQW (head_dim 128: two of 32, so S, dP and the 128
    // registers of dK, dV fit without spilling)
#pragma unroll
    for (int c = 0; c < kBlockM / kQW; ++c) {
      // S^T = K Q^T (16 keys x kQW queries)
      float s[kQW / 8][4];
#pragma unroll
      for (int nt = 0; nt < kQW / 8; ++nt) s[nt][0] = s[nt][1] = s_init0, s[nt][2] = s[nt][3] = s_init1;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        if (kKVInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = kf[kKVInRegs ? kk : 0][i];
        } else {
          ldmatrix_x4(a, kA + 16 * kk);
        }
#pragma unroll
        for (int np = 0; np < kQW / 16; ++np) {
          uint32_t bq[4];
          ldmatrix_x4(bq, qB + qoff + (c * kQW + 16 * np) * kLd + 16 * kk);
          Elem<T>::mma(s[2 * np], a, bq[0], bq[1]);
          Elem<T>::mma(s[2 * np + 1], a, bq[2], bq[3]);
        }
      }
      // P^T = exp2(S^T scale log2(e) - lse log2(e))
#pragma unroll
      for (int nt = 0; nt < kQW / 8; ++nt) {
        const float2 l = *reinterpret_cast<const float2*>(sLse + soff + c * kQW + 8 * nt + 2 * t);
        s[nt][0] = exp2_approx(fmaf(s[nt][0], scale_log2, -l.x));
        s[nt][1] = exp2_approx(fmaf(s[nt][1], scale_log2, -l.y));
        s[nt][2] = exp2_approx(fmaf(s[nt][2], scale_log2, -l.x));
        s[nt][3] = exp2_approx(fmaf(s[nt][3], scale_log2, -l.y));
      }
      // dP^T = V dO^T
      float dp[kQW / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        if (kKVInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = vf[kKVInRegs ? kk : 0][i];
        } else {
          ldmatrix_x4(a, vA + 16 * kk);
        }
#pragma unroll
        for (int np = 0; np < kQW / 16; ++np) {
          uint32_t bo[4];
          ldmatrix_x4(bo, doB + (c * kQW + 16 * np) * kLd + 16 * kk);
          Elem<T>::mma(dp[2 * np], a, bo[0], bo[1]);
          Elem<T>::mma(dp[2 * np + 1], a, bo[2], bo[3]);
        }
      }
      // dS^T = P^T (dP^T Z - delta) scale; (P Z)^T without keep_scale. As A fragments in T.
      uint32_t pa[kQW / 16][4], dsa[kQW / 16][4];
#pragma unroll
      for (int nt = 0; nt < kQW / 8; ++nt) {
        const int n = c * kQW / 8 + nt;  // the n8 fragment in the tile
        const float2 dl = *reinterpret_cast<const float2*>(sDelta + soff + 8 * n + 2 * t);
        float pd[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pz = s[nt][e], dpz = dp[nt][e];
          if (kDropout) select2_if_bit(keep[e & 1], 1u << (8 * (n / 2) + 4 * (e / 2) + 2 * (n % 2)), pz, dpz);
          pd[e] = pz;
          ds[e] = s[nt][e] * fmaf(dpz, ds_scale, -((e & 1) ? dl.y : dl.x));
        }
        pa[nt / 2][2 * (nt & 1)] = Elem<T>::pack(pd[0], pd[1]);
        pa[nt / 2][2 * (nt & 1) + 1] = Elem<T>::pack(pd[2], pd[3]);
        dsa[nt / 2][2 * (nt & 1)] = Elem<T>::pack(ds[0], ds[1]);
        dsa[nt / 2][2 * (nt & 1) + 1] = Elem<T>::pack(ds[2], ds[3]);
      }
      // dV += (P Z)^T dO, dK += dS^T Q (B operands k-major: ldmatrix .trans)
#pragma unroll
      for (int kk = 0; kk < kQW / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          uint32_t bo[4], bq[4];
          ldmatrix_x4_trans(bo, doBt + (c * kQW + 16 * kk) * kLd + 16 * np);
          Elem<T>::mma(dv[2 * np], pa[kk], bo[0], bo[1]);
          Elem<T>::mma(dv[2 * np + 1], pa[kk], bo[2], bo[3]);
          ldmatrix_x4_trans(bq, qBt + qoff + (c * kQW + 16 * kk) * kLd + 16 * np);
          Elem<T>::mma(dk[2 * np], dsa[kk], bq[0], bq[1]);
          Elem<T>::mma(dk[2 * np + 1], dsa[kk], bq[2], bq[3]);
        }
      }
      // dS^T to shared memory ([key][query], as the registers hold it)
#pragma unroll
      for (int nt = 0; nt < kQW / 8; ++nt) {
        *reinterpret_cast<uint32_t*>(dsW + c * kQW + 8 * nt) = dsa[nt / 2][2 * (nt & 1)];
        *reinterpret_cast<uint32_t*>(dsW + 8 * kLdS + c * kQW + 8 * nt) = dsa[nt / 2][2 * (nt & 1) + 1];
      }
    }
    __syncthreads();  // dS complete; every warp is done with sdO and sQ[buf]
    if (more) {
      load_tile(sdO, do_src + do_tile_stride, dout_row_stride, len - m0 - kBlockM);
      cp_async_commit();
    }
    // dQ (this warp's 16 queries) += dS K, in column chunks of up to 64
    uint32_t da[kBlockN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) ldmatrix_x4_trans(da[kk], dsA + 16 * kk * kLdS);
    constexpr int kChunk = D < 64 ? D : D == 64 ? 64 : 32;
#pragma unroll
    for (int c0 = 0; c0 < D; c0 += kChunk) {
      float dq[kChunk / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < kChunk / 16; ++np) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, kBt + 16 * kk * kLd + c0 + 16 * np);
          Elem<T>::mma(dq[2 * np], da[kk], bk[0], bk[1]);
          Elem<T>::mma(dq[2 * np + 1], da[kk], bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kChunk / 8; ++nt) {
        red_add_v2_f32(dq_dst + c0 + 8 * nt, dq[nt][0], dq[nt][1]);
        red_add_v2_f32(dq_dst + dq_row8 + c0 + 8 * nt, dq[nt][2], dq[nt][3]);
      }
    }
    if (more) {
      st_dst[soff ^ kBlockM] = st_next;
      if (kDropout) make_bits(m0 + kBlockM, buf ^ 1);
    }
    q_src += q_tile_stride;
    do_src += do_tile_stride;
    dq_dst += dq_tile_stride;
    buf ^= 1;
    cp_async_wait<0>();
    __syncthreads();  // the next tile's Q, dO, lse, delta, dropout bits have landed; sdS is free
  }

  // dK (scaled through dS) and dV (times keep_scale) of this warp's keys
  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
  const float dv_scale = kDropout ? p.dropout.keep_scale : 1.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = n0 + warp * 16 + g + 8 * r;
    if (key >= len) continue;
    const int64_t at = ((static_cast<int64_t>(start) + key) * p.heads + head) * D + 2 * t;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<uint32_t*>(dk_out + at + nt * 8) = Elem<T>::pack(dk[nt][2 * r], dk[nt][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(dv_out + at + nt * 8) =
          Elem<T>::pack(dv[nt][2 * r] * dv_scale, dv[nt][2 * r + 1] * dv_scale);
    }
  }
}

template <typename T, int D, bool kDropout>
cudaError_t launch_bwd(const AttentionBwdParams& p) {
  constexpr size_t smem = BwdSmem<D>::kBytes;
  cudaError_t err = set_smem(attention_bwd_kernel<T, D, kDropout>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.max_seqlen, kBlockN)), p.heads, p.batch);
  FASTBERT_LAUNCH(grid, kThreads, smem, p.stream, attention_bwd_kernel<T, D, kDropout>)(p);
  return cudaGetLastError();
}

template <typename T, int D>
struct BwdLauncher {
  static cudaError_t run(const AttentionBwdParams& p) {
    return p.dropout.enabled ? launch_bwd<T, D, true>(p) : launch_bwd<T, D, false>(p);
  }
};

}  // namespace

cudaError_t attention_bwd(const AttentionBwdParams& p) {
  if (p.batch == 0 || p.heads == 0 || p.max_seqlen == 0 || p.total_tokens == 0) return cudaSuccess;
  return dispatch<BwdLauncher>(p);
}

}  // namespace fastbert
