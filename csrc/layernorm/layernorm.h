// Residual + LayerNorm over the last dimension: plain params structs and launchers, CUDA headers only.
//
// Forward:  h = x + residual (rounded to the input dtype, written out as `sum`), or h = x;
//           y = (h - mean) * rstd * weight + bias, with mean and rstd in fp32 per row.
// Backward: from dy and the saved h, mean, rstd:
//           dh = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)),  xhat = (h - mean) * rstd
//           dweight = sum_rows dy * xhat, dbias = sum_rows dy, in two stages: each block of the
//           first kernel writes its partial sums to a [num_partials, hidden] fp32 workspace row of
//           its own, and a second kernel reduces the workspace over its rows. No atomics.
#pragma once
#include "common.h"

namespace fastbert {

// The largest hidden size every path (including the unaligned scalar one) supports.
constexpr int64_t kLayerNormMaxHidden = 8192;

// The register budgets (common.h row_budget). The backward keeps its dweight/dbias column sums in
// shared memory (layernorm_bwd_smem_bytes), not registers, so it fits them. The forward with one
// pack a thread gets 32, what ptxas picks for it unconstrained (with 40 it took 39-40, which cut
// BERT-base's 3-warp blocks from 63 to 48 resident warps per SM).
constexpr RowBudget layernorm_fwd_budget(int /*vec*/, int nv) { return nv == 1 ? RowBudget{32, 512} : row_budget(nv); }
constexpr RowBudget layernorm_bwd_budget(int /*vec*/, int nv) { return row_budget(nv); }

// The most packs per thread for vec elements per pack: 16 elements a thread, and 4 packs except on
// the scalar path, which needs 8 on 1,024 threads for kLayerNormMaxHidden.
constexpr int layernorm_max_nv(int vec) { return vec == 1 ? 8 : 16 / vec < 4 ? 16 / vec : 4; }

// Dynamic shared memory of the backward's first kernel: its block's dweight and dbias sums, fp32.
constexpr size_t layernorm_bwd_smem_bytes(int64_t hidden) { return static_cast<size_t>(2 * hidden) * sizeof(float); }

// How the launchers run a row of `hidden` elements: vec elements per access (the widest of 16, 8
// or 4 bytes that divides the row and that every pointer's alignment allows, else 1), nv packs per
// thread (1, 2, 4 or 8) and `threads` per block (a multiple of 32, at most 1024), from row_launch
// under the forward's or the backward's register budget. layernorm_fwd_kernel<T, vec, nv> and
// layernorm_bwd_kernel<T, vec, nv> are launched with it; scripts/kernel_launches.cpp enumerates it.
// max_access_bytes: the widest access the pointers allow (16 when all are 16-byte aligned); weight
// and bias, fp32, are read vec floats at a time.
struct LayerNormConfig {
  int vec;
  int nv;
  int threads;
};

constexpr int kLayerNormAccessBytes[] = {16, 8, 4};  // the vector widths tried, widest first

constexpr RowLaunch layernorm_row_launch(int64_t packs, int vec, bool backward) {
  return backward ? row_launch(packs, layernorm_max_nv(vec), [vec](int nv) { return layernorm_bwd_budget(vec, nv); })
                  : row_launch(packs, layernorm_max_nv(vec), [vec](int nv) { return layernorm_fwd_budget(vec, nv); });
}

constexpr LayerNormConfig layernorm_config(int64_t hidden, DType dtype, int max_access_bytes, bool backward) {
  LayerNormConfig c{};
  c.vec = 1;
  for (int bytes : kLayerNormAccessBytes) {
    const int vec = bytes / dtype_size(dtype);
    if (vec >= 2 && bytes <= max_access_bytes && hidden % vec == 0) {
      c.vec = vec;
      break;
    }
  }
  const RowLaunch l = layernorm_row_launch(hidden / c.vec, c.vec, backward);
  c.nv = l.nv;
  c.threads = l.threads;
  return c;
}

// Bit nv set when a hidden size <= kLayerNormMaxHidden runs vec-element packs with nv packs per
// thread: the launchers instantiate only those kernels (nothing would launch the others).
constexpr unsigned layernorm_nv_mask(int vec, bool backward) {
  unsigned mask = 0;
  for (int64_t packs = 1; packs <= kLayerNormMaxHidden / vec; ++packs)
    mask |= 1u << layernorm_row_launch(packs, vec, backward).nv;
  return mask;
}

// Block of the backward's second kernel (the dweight/dbias reduction): 8 columns (a warp reads 4
// rows of 32 bytes, whole sectors) x 32 row groups; grid ceil(hidden / 8) x 2 (dweight, dbias),
// 192 blocks at hidden 768, enough for every SM.
constexpr int kLayerNormReduceCols = 8, kLayerNormReduceRows = 32;

struct LayerNormFwdParams {
  const void* x;          // [rows, hidden], contiguous, dtype
  const void* residual;   // same as x, or nullptr
  const float* weight;    // [hidden] fp32, or nullptr (= 1)
  const float* bias;      // [hidden] fp32, or nullptr (= 0)
  void* y;                // [rows, hidden], dtype
  void* sum;              // [rows, hidden], dtype: x + residual; nullptr when there is no residual
  float* mean;            // [rows]
  float* rstd;            // [rows]
  int64_t rows;
  int64_t hidden;
  float eps;
  DType dtype;
  cudaStream_t stream;
};

struct LayerNormBwdParams {
  const void* dy;         // [rows, hidden], contiguous, dtype
  const void* h;          // [rows, hidden]: the normalized input (x, or x + residual), dtype
  const float* mean;      // [rows]
  const float* rstd;      // [rows]
  const float* weight;    // [hidden] fp32, or nullptr (= 1)
  void* dx;               // [rows, hidden], dtype
  float* partial;         // workspace [2, num_partials, hidden]: dweight then dbias partial sums
  float* dweight;         // [hidden] fp32
  float* dbias;           // [hidden] fp32
  int64_t rows;
  int64_t hidden;
  DType dtype;
  cudaStream_t stream;
};

// Rows of the backward's workspace (one per thread block of its first kernel) on the current device:
// as many blocks as fit on the GPU at once (cudaOccupancyMaxActiveBlocksPerMultiprocessor of the
// kernel the launcher picks for 16-byte-aligned pointers, times the SM count), at most rows.
int64_t layernorm_bwd_num_partials(int64_t rows, int64_t hidden, DType dtype);

cudaError_t layernorm_fwd(const LayerNormFwdParams& p);
cudaError_t layernorm_bwd(const LayerNormBwdParams& p);  // p.partial sized by layernorm_bwd_num_partials

}  // namespace fastbert
