// extern "C" entry points of the emulated kernels, for fastbert/ops/_emulator.py (ctypes). Each
// fills the op's plain params struct, as csrc/bindings.cpp does for CUDA tensors, and calls the
// op's launcher from csrc/<op>/*.cu, so the launch code runs too. Returns the cudaError_t;
// emu_last_error_message() says what failed.
#include "emu/cuda_emu.h"

#include <mutex>

#include "attention/attention.h"
#include "bias_dropout_residual_layernorm/bias_dropout_residual_layernorm.h"
#include "bias_gelu/bias_gelu.h"
#include "cross_entropy/cross_entropy.h"
#include "gather/gather.h"
#include "layernorm/layernorm.h"

extern "C" void emu_begin(void);
extern "C" void emu_end(void);

namespace {

template <typename F>
int guarded(F&& call) {
  emu_begin();
  cudaError_t err = call();
  if (err == cudaSuccess) err = cudaGetLastError();
  emu_end();
  return static_cast<int>(err);
}

fastbert::AttentionDropout dropout(int enabled, uint32_t keep_threshold, float keep_scale, uint64_t seed,
                                   uint32_t offset) {
  fastbert::AttentionDropout d{};
  d.enabled = enabled != 0;
  d.keep_threshold = keep_threshold;
  d.keep_scale = keep_scale;
  d.seed = seed;
  d.offset = offset;
  return d;
}

// q, k, v strides in elements: [q_row, q_head, k_row, k_head, v_row, v_head].
void set_problem(fastbert::AttentionProblem& p, const void* q, const void* k, const void* v, const int32_t* cu,
                 const int64_t* strides, int batch, int heads, int head_dim, int max_seqlen, int64_t total,
                 float scale, fastbert::AttentionDropout d, int dtype) {
  p.q = q;
  p.k = k;
  p.v = v;
  p.cu_seqlens = cu;
  p.q_row_stride = strides[0], p.q_head_stride = strides[1];
  p.k_row_stride = strides[2], p.k_head_stride = strides[3];
  p.v_row_stride = strides[4], p.v_head_stride = strides[5];
  p.batch = batch;
  p.heads = heads;
  p.head_dim = head_dim;
  p.max_seqlen = max_seqlen;
  p.total_tokens = total;
  p.scale = scale;
  p.dropout = d;
  p.dtype = static_cast<fastbert::DType>(dtype);
  p.stream = nullptr;
}

}  // namespace

extern "C" {

int emu_gather_rows(const void* src, void* dst, const int64_t* index, int64_t num_index, int64_t row_bytes,
                    int64_t src_row_stride, int64_t dst_row_stride) {
  fastbert::GatherRowsParams p{src, dst, index, num_index, row_bytes, src_row_stride, dst_row_stride, nullptr};
  return guarded([&] { return fastbert::gather_rows(p); });
}

int emu_scatter_rows(const void* src, void* dst, const int64_t* index, int32_t* inverse, int64_t num_index,
                     int64_t num_dst_rows, int64_t row_bytes, int64_t src_row_stride, int64_t dst_row_stride) {
  fastbert::ScatterRowsParams p{src, dst, index, inverse, num_index, num_dst_rows, row_bytes, src_row_stride,
                                dst_row_stride, nullptr};
  return guarded([&] { return fastbert::scatter_rows(p); });
}

int64_t emu_layernorm_bwd_num_partials(int64_t rows, int64_t hidden, int dtype) {
  return fastbert::layernorm_bwd_num_partials(rows, hidden, static_cast<fastbert::DType>(dtype));
}

int emu_layernorm_fwd(const void* x, const void* residual, const float* weight, const float* bias, void* y,
                      void* sum, float* mean, float* rstd, int64_t rows, int64_t hidden, float eps, int dtype) {
  fastbert::LayerNormFwdParams p{x, residual, weight, bias, y, sum, mean, rstd, rows, hidden, eps,
                                 static_cast<fastbert::DType>(dtype), nullptr};
  return guarded([&] { return fastbert::layernorm_fwd(p); });
}

int emu_layernorm_bwd(const void* dy, const void* h, const float* mean, const float* rstd, const float* weight,
                      void* dx, float* partial, float* dweight, float* dbias, int64_t rows, int64_t hidden,
                      int dtype) {
  fastbert::LayerNormBwdParams p{dy, h, mean, rstd, weight, dx, partial, dweight, dbias, rows, hidden,
                                 static_cast<fastbert::DType>(dtype), nullptr};
  return guarded([&] { return fastbert::layernorm_bwd(p); });
}

int emu_cross_entropy_fwd(const void* logits, const int64_t* labels, float* loss, float* lse, int64_t rows,
                          int64_t classes, int64_t row_stride, int64_t ignore_index, int dtype) {
  fastbert::CrossEntropyFwdParams p{logits, labels, loss, lse, rows, classes, row_stride, ignore_index,
                                    static_cast<fastbert::DType>(dtype), nullptr};
  return guarded([&] { return fastbert::cross_entropy_fwd(p); });
}

int emu_cross_entropy_bwd(const float* grad_loss, const void* logits, void* grad, const int64_t* labels,
                          const float* lse, int64_t rows, int64_t classes, int64_t logits_row_stride,
                          int64_t grad_row_stride, int64_t ignore_index, int dtype) {
  fastbert::CrossEntropyBwdParams p{grad_loss, logits, grad, labels, lse, rows, classes, logits_row_stride,
                                    grad_row_stride, ignore_index, static_cast<fastbert::DType>(dtype), nullptr};
  return guarded([&] { return fastbert::cross_entropy_bwd(p); });
}

int emu_attention_fwd(const void* q, const void* k, const void* v, const int32_t* cu, const int64_t* strides,
                      int batch, int heads, int head_dim, int max_seqlen, int64_t total, float scale,
                      int dropout_enabled, uint32_t keep_threshold, float keep_scale, uint64_t seed, uint32_t offset,
                      int dtype, void* out, float* lse) {
  fastbert::AttentionFwdParams p{};
  set_problem(p, q, k, v, cu, strides, batch, heads, head_dim, max_seqlen, total, scale,
              dropout(dropout_enabled, keep_threshold, keep_scale, seed, offset), dtype);
  p.out = out;
  p.lse = lse;
  return guarded([&] { return fastbert::attention_fwd(p); });
}

int emu_attention_bwd(const void* q, const void* k, const void* v, const int32_t* cu, const int64_t* strides,
                      int batch, int heads, int head_dim, int max_seqlen, int64_t total, float scale,
                      int dropout_enabled, uint32_t keep_threshold, float keep_scale, uint64_t seed, uint32_t offset,
                      int dtype, const void* dout, const float* lse, const float* delta, float* dq_accum, void* dk,
                      void* dv) {
  fastbert::AttentionBwdParams p{};
  set_problem(p, q, k, v, cu, strides, batch, heads, head_dim, max_seqlen, total, scale,
              dropout(dropout_enabled, keep_threshold, keep_scale, seed, offset), dtype);
  p.dout = dout;
  p.lse = lse;
  p.delta = delta;
  p.dq_accum = dq_accum;
  p.dk = dk;
  p.dv = dv;
  return guarded([&] { return fastbert::attention_bwd(p); });
}

int emu_attention_bwd_delta(const void* dout, const void* out, const int64_t* strides, float* delta, int64_t total,
                            int heads, int head_dim, int dtype) {
  fastbert::AttentionDeltaParams p{};
  p.dout = dout;
  p.out = out;
  p.dout_row_stride = strides[0], p.dout_head_stride = strides[1];
  p.out_row_stride = strides[2], p.out_head_stride = strides[3];
  p.delta = delta;
  p.total_tokens = total;
  p.heads = heads;
  p.head_dim = head_dim;
  p.dtype = static_cast<fastbert::DType>(dtype);
  p.stream = nullptr;
  return guarded([&] { return fastbert::attention_bwd_delta(p); });
}

int emu_attention_dropout_mask(const int32_t* cu, uint8_t* keep, int batch, int heads, int max_seqlen,
                               int dropout_enabled, uint32_t keep_threshold, float keep_scale, uint64_t seed,
                               uint32_t offset) {
  fastbert::AttentionDropoutMaskParams p{};
  p.cu_seqlens = cu;
  p.keep = keep;
  p.batch = batch;
  p.heads = heads;
  p.max_seqlen = max_seqlen;
  p.dropout = dropout(dropout_enabled, keep_threshold, keep_scale, seed, offset);
  p.stream = nullptr;
  return guarded([&] { return fastbert::attention_dropout_mask(p); });
}

int64_t emu_bias_gelu_bwd_num_partials(int64_t rows, int64_t cols, int dtype) {
  return fastbert::bias_gelu_bwd_num_partials(rows, cols, static_cast<fastbert::DType>(dtype));
}

// kind: 0 erf ("none"), 1 tanh.
int emu_bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t cols, int kind, int dtype) {
  fastbert::BiasGeluFwdParams p{x, bias, y, rows, cols, static_cast<fastbert::GeluKind>(kind),
                                static_cast<fastbert::DType>(dtype), nullptr};
  return guarded([&] { return fastbert::bias_gelu_fwd(p); });
}

int emu_bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, float* partial, void* dbias,
                      int64_t rows, int64_t cols, int kind, int dtype, int dbias_dtype) {
  fastbert::BiasGeluBwdParams p{dy, x, bias, dx, partial, dbias, rows, cols, static_cast<fastbert::GeluKind>(kind),
                                static_cast<fastbert::DType>(dtype), nullptr,
                                static_cast<fastbert::DType>(dbias_dtype)};
  return guarded([&] { return fastbert::bias_gelu_bwd(p); });
}

int64_t emu_bdrln_bwd_num_partials(int64_t rows, int64_t hidden, int dtype) {
  return fastbert::bdrln_bwd_num_partials(rows, hidden, static_cast<fastbert::DType>(dtype));
}

// dropout_p as the binding gets it; the rule of csrc/row_dropout.h turns it into the threshold.
// residual2 and after_norm (the embeddings' mode): nullptr and 0 for bias_dropout_residual_layernorm.
int emu_bdrln_fwd(const void* x, const float* bias, const void* residual, const void* residual2, const float* weight,
                  const float* beta, void* y, void* h, float* mean, float* rstd, int64_t rows, int64_t hidden,
                  float eps, double dropout_p, uint64_t seed, uint32_t offset, int after_norm, int dtype) {
  fastbert::BdrlnFwdParams p{x, bias, residual, residual2, weight, beta, y, h, mean, rstd, rows, hidden, eps,
                             fastbert::make_row_dropout(dropout_p, seed, offset), after_norm != 0,
                             static_cast<fastbert::DType>(dtype), nullptr};
  return guarded([&] { return fastbert::bdrln_fwd(p); });
}

int emu_bdrln_bwd(const void* dy, const void* h, const float* mean, const float* rstd, const float* weight, void* dx,
                  void* dresidual, float* partial, void* dweight, void* dbeta, void* dbias, int64_t rows,
                  int64_t hidden, double dropout_p, uint64_t seed, uint32_t offset, int after_norm, int dtype,
                  int grad_dtype) {
  fastbert::BdrlnBwdParams p{dy, h, mean, rstd, weight, dx, dresidual, partial, dweight, dbeta, dbias, rows, hidden,
                             fastbert::make_row_dropout(dropout_p, seed, offset), after_norm != 0,
                             static_cast<fastbert::DType>(dtype), nullptr, static_cast<fastbert::DType>(grad_dtype)};
  return guarded([&] { return fastbert::bdrln_bwd(p); });
}

}  // extern "C"
