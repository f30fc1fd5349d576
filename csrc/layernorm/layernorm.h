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

// How the launchers run a row of `hidden` elements: vec elements per access (16 bytes' worth when
// the hidden size and the pointers allow it, else 1), nv packs per thread (1, 2, 4 or 8) and
// `threads` per block (a multiple of 32, at most 1024). layernorm_fwd_kernel<T, vec, nv> and
// layernorm_bwd_kernel<T, vec, nv> are launched with it; scripts/kernel_report.py enumerates it.
struct LayerNormConfig {
  int vec;
  int nv;
  int threads;
};

constexpr LayerNormConfig layernorm_config(int64_t hidden, DType dtype, bool pointers_aligned) {
  LayerNormConfig c{};
  const int wide = 16 / dtype_size(dtype);
  c.vec = (pointers_aligned && hidden % wide == 0) ? wide : 1;
  const int64_t packs = hidden / c.vec;
  c.nv = 1;
  while (c.nv < 8 && ceil_div(packs, c.nv) > 512) c.nv *= 2;  // keep blocks at most 512 threads when we can
  c.threads = static_cast<int>(ceil_div(ceil_div(packs, c.nv), 32) * 32);
  // hidden <= kLayerNormMaxHidden gives nv <= 2 (16-bit) or 4 (fp32) with 16-byte packs, and
  // threads > 512 only with nv * vec <= 8, within the kernels' __launch_bounds__.
  return c;
}

// The most packs per thread layernorm_config picks for any hidden <= kLayerNormMaxHidden with vec
// elements per pack: the launchers instantiate no kernel with more (nothing would launch it).
constexpr int layernorm_max_packs_per_thread(int vec) {
  int nv = 1;
  while (nv < 8 && ceil_div(ceil_div(kLayerNormMaxHidden, vec), nv) > 512) nv *= 2;
  return nv;
}

// Block of the backward's second kernel (the dweight/dbias reduction): 32 columns x 8 row groups.
constexpr int kLayerNormReduceCols = 32, kLayerNormReduceRows = 8;

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

// Rows of the backward's workspace (one per thread block of its first kernel) on the current device.
int64_t layernorm_bwd_num_partials(int64_t rows, int64_t hidden, DType dtype);

cudaError_t layernorm_fwd(const LayerNormFwdParams& p);
cudaError_t layernorm_bwd(const LayerNormBwdParams& p);  // p.partial sized by layernorm_bwd_num_partials

}  // namespace fastbert
