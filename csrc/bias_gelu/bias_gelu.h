// Bias + GELU after BERT's intermediate matmul, fused: plain params structs and launchers, CUDA
// headers only.
//
// Forward:  y = gelu(x + bias) over x [rows, cols] (cols = the intermediate size), fp32 math,
//           one rounding to the input dtype.
// Backward: dx = dy * gelu'(x + bias) (the forward recomputed from x, no saved activation),
//           dbias = sum_rows dx in fp32, in two stages: each block row of the first kernel writes
//           its column sums to a [num_partials, cols] fp32 workspace row of its own, a second
//           kernel adds the workspace up. No atomics.
// gelu: kErf is BERT's exact 0.5 x (1 + erf(x / sqrt 2)) (transformers' "gelu"); kTanh is
// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) ("gelu_new", "gelu_pytorch_tanh").
//
// Why a kernel and not cuBLASLt's GELU epilogue: torch exposes that epilogue as
// torch._addmm_activation(bias, x, w, use_gelu=True), but it computes the tanh approximation
// only; BERT's checkpoints are trained with erf GELU, so the erf path needs this kernel (and one
// kernel serves both kinds).
#pragma once
#include "common.h"

namespace fastbert {

enum class GeluKind : int { kErf = 0, kTanh = 1 };

// Block: 32 threads across columns (one 16-byte pack each) x 8 across rows.
constexpr int kBiasGeluThreadsX = 32, kBiasGeluThreadsY = 8;
// Resident blocks per SM the backward's row split aims for (256 threads each: 2048 threads per SM).
constexpr int kBiasGeluBlocksPerSm = 8;

struct BiasGeluFwdParams {
  const void* x;        // [rows, cols], contiguous, dtype
  const float* bias;    // [cols] fp32
  void* y;              // [rows, cols], dtype
  int64_t rows;
  int64_t cols;
  GeluKind kind;
  DType dtype;
  cudaStream_t stream;
};

struct BiasGeluBwdParams {
  const void* dy;       // [rows, cols], contiguous, dtype
  const void* x;        // [rows, cols]: the forward's input (before the bias)
  const float* bias;    // [cols] fp32
  void* dx;             // [rows, cols], dtype
  float* partial;       // workspace [num_partials, cols] fp32
  void* dbias;          // [cols], dbias_dtype (the bias's)
  int64_t rows;
  int64_t cols;
  GeluKind kind;
  DType dtype;
  cudaStream_t stream;
  DType dbias_dtype;
};

// Rows of the backward's workspace (its grid's row split) on the current device.
int64_t bias_gelu_bwd_num_partials(int64_t rows, int64_t cols, DType dtype);

cudaError_t bias_gelu_fwd(const BiasGeluFwdParams& p);
cudaError_t bias_gelu_bwd(const BiasGeluBwdParams& p);  // p.partial sized by bias_gelu_bwd_num_partials

}  // namespace fastbert
