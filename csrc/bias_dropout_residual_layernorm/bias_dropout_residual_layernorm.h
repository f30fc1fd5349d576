// Bias + dropout + residual + LayerNorm, fused: what follows each dense layer of BERT's post-LN
// blocks (attention output and feed-forward output). Plain params structs and launchers, CUDA
// headers only.
//
// Forward:  h = dropout(x + bias) + residual, rounded to the input dtype and written out (the
//           backward reads it); y = (h - mean) * rstd * weight + beta, mean and rstd fp32 per row.
//           dropout is csrc/row_dropout.h's Philox rule over (row, column) of x.
// Backward: from dy, the saved h, mean, rstd and the same dropout (seed, offset):
//           dresidual = dh = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy * xhat)),
//           dx = dh * keep / (1 - p), and the column sums dweight = sum dy * xhat, dbeta = sum dy,
//           dbias = sum dx, in fp32, in two stages: each block of the first kernel writes its partial
//           sums to its own row of a [3, num_partials, hidden] fp32 workspace, a second kernel adds
//           them up. No atomics.
//
// The embeddings' mode (dropout_after_norm, used by the op embeddings_layernorm_dropout):
//           h = x + residual + residual2 (word + token type + position embeddings), no bias,
//           y = dropout(LayerNorm(h)); the backward drops out dy first, then runs the LayerNorm
//           backward (dresidual = dh; dx and dbias are not needed there: dx may be nullptr).
#pragma once
#include "common.h"
#include "row_dropout.h"

namespace fastbert {

// The largest hidden size the kernels take (BERT-large is 1024): a row lives in registers.
constexpr int64_t kBdrlnMaxHidden = 4096;

// The backward keeps its three column sums (dweight, dbeta, dbias) in shared memory
// (bdrln_bwd_smem_bytes), not registers, so both directions fit the same budgets (common.h row_budget).
constexpr RowBudget bdrln_fwd_budget(int /*vec*/, int nv) { return row_budget(nv); }
constexpr RowBudget bdrln_bwd_budget(int /*vec*/, int nv) { return row_budget(nv); }

// The most packs per thread for vec elements per pack: 16 elements a thread, 4 packs at most
// (1,024 threads x 4 cover kBdrlnMaxHidden on the scalar path).
constexpr int bdrln_max_nv(int vec) { return 16 / vec < 4 ? 16 / vec : 4; }

// How the launchers run a row of `hidden` elements: vec elements per access (16 bytes' worth when
// the hidden size and the pointers allow it, else 1), nv packs per thread and `threads` per block
// (a multiple of 32, at most 1024), from row_launch under the forward's or the backward's budget.
// scripts/kernel_launches.cpp enumerates it.
struct BdrlnConfig {
  int vec;
  int nv;
  int threads;
};

constexpr RowLaunch bdrln_row_launch(int64_t packs, int vec, bool backward) {
  return backward ? row_launch(packs, bdrln_max_nv(vec), [vec](int nv) { return bdrln_bwd_budget(vec, nv); })
                  : row_launch(packs, bdrln_max_nv(vec), [vec](int nv) { return bdrln_fwd_budget(vec, nv); });
}

constexpr BdrlnConfig bdrln_config(int64_t hidden, DType dtype, bool pointers_aligned, bool backward) {
  BdrlnConfig c{};
  const int wide = 16 / dtype_size(dtype);
  c.vec = (pointers_aligned && hidden % wide == 0) ? wide : 1;
  const RowLaunch l = bdrln_row_launch(hidden / c.vec, c.vec, backward);
  c.nv = l.nv;
  c.threads = l.threads;
  return c;
}

// Bit nv set when a hidden size <= kBdrlnMaxHidden runs vec-element packs with nv packs per thread:
// the launchers instantiate only those kernels.
constexpr unsigned bdrln_nv_mask(int vec, bool backward) {
  unsigned mask = 0;
  for (int64_t packs = 1; packs <= kBdrlnMaxHidden / vec; ++packs) mask |= 1u << bdrln_row_launch(packs, vec, backward).nv;
  return mask;
}

// Dynamic shared memory of the backward's first kernel: its block's three column sums, fp32.
constexpr size_t bdrln_bwd_smem_bytes(int64_t hidden) { return static_cast<size_t>(3 * hidden) * sizeof(float); }

// Resident blocks per SM the backward aims for (its workspace rows = SMs x this, at most the rows).
constexpr int kBdrlnBwdBlocksPerSm = 8;
// Block of the backward's second kernel (the column sums): 32 columns x 8 row groups.
constexpr int kBdrlnReduceCols = 32, kBdrlnReduceRows = 8;

struct BdrlnFwdParams {
  const void* x;          // [rows, hidden], contiguous, dtype: the dense output without its bias
  const float* bias;      // [hidden] fp32, or nullptr (= 0)
  const void* residual;   // [rows, hidden], contiguous, dtype
  const void* residual2;  // [rows, hidden], contiguous, dtype, added too; or nullptr
  const float* weight;    // [hidden] fp32 LayerNorm weight, or nullptr (= 1)
  const float* beta;      // [hidden] fp32 LayerNorm bias, or nullptr (= 0)
  void* y;                // [rows, hidden], dtype
  void* h;                // [rows, hidden], dtype: dropout(x + bias) + residual
  float* mean;            // [rows]
  float* rstd;            // [rows]
  int64_t rows;
  int64_t hidden;
  float eps;
  RowDropout dropout;
  bool dropout_after_norm;  // the embeddings' order: y = dropout(LayerNorm(h))
  DType dtype;
  cudaStream_t stream;
};

struct BdrlnBwdParams {
  const void* dy;         // [rows, hidden], contiguous, dtype
  const void* h;          // [rows, hidden], the forward's h
  const float* mean;      // [rows]
  const float* rstd;      // [rows]
  const float* weight;    // [hidden] fp32, or nullptr (= 1)
  void* dx;               // [rows, hidden], dtype: d x (and d bias before the row sum); or nullptr
  void* dresidual;        // [rows, hidden], dtype: d residual (= d h)
  float* partial;         // workspace [3, num_partials, hidden]: dweight, dbeta, dbias partial sums
  void* dweight;          // [hidden], grad_dtype
  void* dbeta;            // [hidden], grad_dtype
  void* dbias;            // [hidden], grad_dtype
  int64_t rows;
  int64_t hidden;
  RowDropout dropout;     // the forward's
  bool dropout_after_norm;  // the forward's
  DType dtype;
  cudaStream_t stream;
  DType grad_dtype;       // of dweight, dbeta, dbias: the parameters' (fp32 by default)
};

// Rows of the backward's workspace (one per block of its first kernel) on the current device.
int64_t bdrln_bwd_num_partials(int64_t rows, int64_t hidden, DType dtype);

cudaError_t bdrln_fwd(const BdrlnFwdParams& p);
cudaError_t bdrln_bwd(const BdrlnBwdParams& p);  // p.partial sized by bdrln_bwd_num_partials

}  // namespace fastbert
