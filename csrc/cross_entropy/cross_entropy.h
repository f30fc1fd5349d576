// Softmax cross-entropy over rows of logits: plain params structs and launchers, CUDA headers only.
//
// Forward (one pass over the logits): per row, lse = logsumexp(logits[row]) by an online softmax
// (running max and rescaled sum, fp32), loss = lse - logits[row, label]. Rows whose label is
// ignore_index get loss 0 and lse 0 and are not read. The mean over counted rows is left to the
// caller (a sum over [rows]), so the kernel needs no cross-block reduction.
// Backward (one pass): grad[row, c] = grad_loss[row] * (exp(logits[row, c] - lse[row]) - (c == label)),
// zero on ignored rows. `grad` may be `logits` itself (in place): each element is read and then
// written by the same thread, so no second [rows, classes] buffer is needed.
#pragma once
#include "common.h"

namespace fastbert {

// The most threads per block of the kernels (one block per row, 32 per 16-byte pack up to this).
constexpr int kCrossEntropyMaxThreads = 256;

struct CrossEntropyFwdParams {
  const void* logits;     // [rows, classes], unit stride along classes, dtype
  const int64_t* labels;  // [rows]: in [0, classes) or ignore_index
  float* loss;            // [rows]
  float* lse;             // [rows]
  int64_t rows;
  int64_t classes;
  int64_t row_stride;     // elements between consecutive rows of logits
  int64_t ignore_index;
  DType dtype;
  cudaStream_t stream;
};

struct CrossEntropyBwdParams {
  const float* grad_loss; // [rows]: d(total)/d(loss[row])
  const void* logits;     // [rows, classes], unit stride along classes, dtype
  void* grad;             // [rows, classes], dtype; may equal logits (same strides then)
  const int64_t* labels;  // [rows]
  const float* lse;       // [rows], from the forward
  int64_t rows;
  int64_t classes;
  int64_t logits_row_stride;
  int64_t grad_row_stride;
  int64_t ignore_index;
  DType dtype;
  cudaStream_t stream;
};

cudaError_t cross_entropy_fwd(const CrossEntropyFwdParams& p);
cudaError_t cross_entropy_bwd(const CrossEntropyBwdParams& p);

}  // namespace fastbert
