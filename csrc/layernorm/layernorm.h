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
