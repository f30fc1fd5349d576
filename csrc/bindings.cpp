// The one file that sees torch: it declares every fastbert op with TORCH_LIBRARY, checks and
// unpacks tensors into the plain params structs of csrc/<op>/<op>.h, and launches on the
// current stream. Python (fastbert/ops/*.py) registers the fake kernels, the autograd and the
// pure-PyTorch twins (as the CPU kernels).
#include <Python.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef FASTBERT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "gather/gather.h"
#include "layernorm/layernorm.h"          // layernorm
#include "cross_entropy/cross_entropy.h"  // cross_entropy
#include "attention/attention.h"  // attention
#include "bias_gelu/bias_gelu.h"  // bias_gelu
#include "bias_dropout_residual_layernorm/bias_dropout_residual_layernorm.h"  // bias_dropout_residual_layernorm
#endif

// `import fastbert._C` loads this library, which registers the ops below in torch.ops.fastbert.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastbert kernels; the ops live in torch.ops.fastbert", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

#ifdef FASTBERT_WITH_CUDA
namespace {
// What setup.py compiled the kernels for (from torch's -gencode flags): "sm_80;sm_90;compute_90".
// sm_XY is machine code for XY (runs on X.Y..X.9), compute_XY is PTX (JIT-compiled on XY and newer).
std::string cuda_arch_list() {
#if defined(FASTBERT_SASS_ARCHS) && defined(FASTBERT_PTX_ARCHS)
  const std::vector<int> sass = {FASTBERT_SASS_ARCHS}, ptx = {FASTBERT_PTX_ARCHS};
  std::string out;
  for (int a : sass) out += (out.empty() ? "" : ";") + std::string("sm_") + std::to_string(a);
  for (int a : ptx) out += (out.empty() ? "" : ";") + std::string("compute_") + std::to_string(a);
  return out;
#else
  return "";  // not recorded by this build: the caller checks the compute capability only
#endif
}

// Dynamic shared memory the attention launcher requests (csrc/attention/attention.h), in bytes.
int64_t attention_smem_bytes(int64_t head_dim, int64_t element_size, bool backward) {
  TORCH_CHECK(element_size == 2, "attention_smem_bytes: the kernels take 2-byte elements, got ", element_size);
  bool built = false;
  for (int d : fastbert::kAttentionHeadDims) built = built || d == head_dim;
  TORCH_CHECK(built, "attention_smem_bytes: no kernel for head_dim ", head_dim);
  const int d = static_cast<int>(head_dim), e = static_cast<int>(element_size);
  return static_cast<int64_t>(backward ? fastbert::attention_bwd_smem_bytes(d, e) : fastbert::attention_fwd_smem_bytes(d, e));
}
}  // namespace
#endif

TORCH_LIBRARY(fastbert, m) {
#ifdef FASTBERT_WITH_CUDA
  // Build facts the Python dispatch checks before it uses a kernel (fastbert/_backend.py).
  m.def("cuda_arch_list() -> str", &cuda_arch_list);
  m.def("attention_smem_bytes(int head_dim, int element_size, bool backward) -> int", &attention_smem_bytes);
#endif
  // out[i] = x[index[i]]; x is [rows, hidden], index is 1-d int64 with values in [0, rows).
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  // out = zeros(num_rows, hidden); out[index[i]] = src[i]; index values unique.
  m.def("scatter_rows(Tensor src, Tensor index, SymInt num_rows) -> Tensor");
  // ---- attention (csrc/attention/): flash-style, packed varlen [total_tokens, heads, head_dim] ----
  // out = softmax(q kᵀ·scale) v per sequence of cu_seqlens (int32 [batch+1]); lse [heads, total] fp32.
  // Dropout on the probabilities from Philox(seed, offset); dropout_p = 0 turns it off.
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float scale, "
        "float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  // (dq, dk, dv) from the forward's out and lse; the same seed/offset regenerate the dropout mask.
  m.def("attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens, int max_seqlen, float scale, float dropout_p, int seed, int offset) "
        "-> (Tensor, Tensor, Tensor)");
  // The backward's preprocessing: delta [heads, total] fp32 = rowsum(dout * out) over head_dim.
  m.def("attention_bwd_delta(Tensor dout, Tensor out) -> Tensor");
  // The dropout keep mask the two ops above use: bool [batch, heads, max_seqlen, max_seqlen].
  m.def("attention_dropout_mask(Tensor cu_seqlens, int heads, int max_seqlen, float dropout_p, int seed, "
        "int offset) -> Tensor");
  // ---- end attention ----
  // ---- layernorm (csrc/layernorm/): y = LayerNorm(x + residual) over the last dim ----
  // sum = x + residual in x's dtype (empty without a residual); mean, rstd fp32 [rows].
  m.def("layernorm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor y, Tensor sum, Tensor mean, Tensor rstd)");
  // h is what was normalized (sum, or x without a residual); dweight, dbias fp32 [hidden].
  m.def("layernorm_bwd(Tensor dy, Tensor h, Tensor mean, Tensor rstd, Tensor? weight) "
        "-> (Tensor dx, Tensor dweight, Tensor dbias)");
  // ---- end layernorm ----
  // ---- cross_entropy (csrc/cross_entropy/): per-row softmax cross-entropy, fp32 math ----
  // loss, lse fp32 [rows]; rows labelled ignore_index get 0 and 0.
  m.def("cross_entropy_fwd(Tensor logits, Tensor labels, int ignore_index) -> (Tensor loss, Tensor lse)");
  // grad_logits = grad_loss[:, None] * (softmax(logits) - onehot(labels)); zero on ignored rows.
  m.def("cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
  // The same, written over the logits (no second [rows, classes] buffer); eager use only.
  m.def("cross_entropy_bwd_(Tensor grad_loss, Tensor(a!) logits, Tensor labels, Tensor lse, int ignore_index) -> ()");
  // ---- end cross_entropy ----
  // ---- bias_gelu (csrc/bias_gelu/): y = gelu(x + bias) after the intermediate matmul ----
  // approximate: "none" (erf, BERT's "gelu") or "tanh" ("gelu_new", "gelu_pytorch_tanh"), as F.gelu.
  m.def("bias_gelu_fwd(Tensor x, Tensor bias, str approximate) -> Tensor");
  // dx = dy * gelu'(x + bias) in x's dtype; dbias = sum over rows of dx (fp32 sums) in bias's dtype [cols].
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor bias, str approximate) -> (Tensor dx, Tensor dbias)");
  // ---- end bias_gelu ----
  // ---- bias_dropout_residual_layernorm (csrc/bias_dropout_residual_layernorm/) ----
  // h = dropout(x + bias) + residual (Philox(seed, offset), csrc/row_dropout.h), y = LayerNorm(h);
  // h in x's dtype, mean and rstd fp32 [rows].
  m.def("bias_dropout_residual_layernorm_fwd(Tensor x, Tensor? bias, Tensor residual, Tensor? weight, "
        "Tensor? ln_bias, float eps, float dropout_p, int seed, int offset) "
        "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // From the forward's h, mean, rstd and dropout: dx, dresidual in h's dtype; dweight, dln_bias,
  // dbias [hidden] (fp32 sums) in weight's dtype, fp32 without a weight.
  m.def("bias_dropout_residual_layernorm_bwd(Tensor dy, Tensor h, Tensor mean, Tensor rstd, Tensor? weight, "
        "float dropout_p, int seed, int offset) "
        "-> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dln_bias, Tensor dbias)");
  // ---- end bias_dropout_residual_layernorm ----
  // ---- embeddings_layernorm_dropout (a mode of csrc/bias_dropout_residual_layernorm/) ----
  // h = a + b (+ c), y = dropout(LayerNorm(h)) (Philox(seed, offset), csrc/row_dropout.h): the
  // embeddings' word + token type + position sum, norm and dropout. h in a's dtype, mean/rstd fp32.
  m.def("embeddings_layernorm_dropout_fwd(Tensor a, Tensor b, Tensor? c, Tensor? weight, Tensor? bias, float eps, "
        "float dropout_p, int seed, int offset) -> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // dh (the gradient of each of a, b, c) in h's dtype; dweight, dbias fp32 [hidden].
  m.def("embeddings_layernorm_dropout_bwd(Tensor dy, Tensor h, Tensor mean, Tensor rstd, Tensor? weight, "
        "float dropout_p, int seed, int offset) -> (Tensor dh, Tensor dweight, Tensor dbias)");
  // ---- end embeddings_layernorm_dropout ----
}

#ifdef FASTBERT_WITH_CUDA
namespace {

#define FASTBERT_CHECK_CUDA(expr, what)                                                      \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    TORCH_CHECK(err_ == cudaSuccess, "fastbert ", what, ": CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Rows of a 2-d tensor must be dense (unit stride along hidden); the row stride may be anything.
at::Tensor dense_rows(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

void check_rows_and_index(const at::Tensor& x, const at::Tensor& index, const char* op) {
  TORCH_CHECK(x.is_cuda() && index.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(x.device() == index.device(), op, ": x and index are on different devices");
  TORCH_CHECK(x.dim() == 2, op, ": expected a 2-d [rows, hidden] tensor, got ", x.dim(), "-d");
  TORCH_CHECK(index.dim() == 1, op, ": expected a 1-d index, got ", index.dim(), "-d");
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, op,
              ": index must be int64 or int32, got ", index.scalar_type());
}

at::Tensor gather_rows_cuda(const at::Tensor& x_in, const at::Tensor& index_in) {
  check_rows_and_index(x_in, index_in, "gather_rows");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = dense_rows(x_in);
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty({index.size(0), x.size(1)}, x.options());
  fastbert::GatherRowsParams p{};
  p.src = x.data_ptr();
  p.dst = out.data_ptr();
  p.index = index.data_ptr<int64_t>();
  p.num_index = index.size(0);
  p.row_bytes = x.size(1) * x.element_size();
  p.src_row_stride = x.stride(0) * x.element_size();
  p.dst_row_stride = out.stride(0) * out.element_size();
  p.stream = current_stream(x);
  FASTBERT_CHECK_CUDA(fastbert::gather_rows(p), "gather_rows");
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& src_in, const at::Tensor& index_in, int64_t num_rows) {
  check_rows_and_index(src_in, index_in, "scatter_rows");
  TORCH_CHECK(src_in.size(0) == index_in.size(0), "scatter_rows: src has ", src_in.size(0),
              " rows but index has ", index_in.size(0), " entries");
  TORCH_CHECK(num_rows >= 0 && num_rows < (int64_t(1) << 31), "scatter_rows: num_rows out of range");
  c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = dense_rows(src_in);
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty({num_rows, src.size(1)}, src.options());
  at::Tensor inverse = at::empty({num_rows}, src.options().dtype(at::kInt));
  fastbert::ScatterRowsParams p{};
  p.src = src.data_ptr();
  p.dst = out.data_ptr();
  p.index = index.data_ptr<int64_t>();
  p.inverse = inverse.data_ptr<int32_t>();
  p.num_index = index.size(0);
  p.num_dst_rows = num_rows;
  p.row_bytes = src.size(1) * src.element_size();
  p.src_row_stride = src.stride(0) * src.element_size();
  p.dst_row_stride = out.stride(0) * out.element_size();
  p.stream = current_stream(src);
  FASTBERT_CHECK_CUDA(fastbert::scatter_rows(p), "scatter_rows");
  return out;
}

// ---- attention ----------------------------------------------------------------------------
fastbert::AttentionDropout attention_dropout(double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention: dropout_p must be in [0, 1), got ", dropout_p);
  return fastbert::make_attention_dropout(dropout_p, static_cast<uint64_t>(seed), static_cast<uint32_t>(offset));
}

// Unit stride along head_dim, 16-byte aligned rows: what the kernel's vector loads need.
at::Tensor attention_operand(const at::Tensor& x) {
  const bool ok = x.stride(2) == 1 && x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);  // clone: a contiguous view may still be misaligned
}

fastbert::DType attention_dtype(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the CUDA kernel takes float16 or bfloat16, got ", q.scalar_type());
  return q.scalar_type() == at::kHalf ? fastbert::DType::kFloat16 : fastbert::DType::kBFloat16;
}

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens, int64_t max_seqlen, const char* op) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && cu_seqlens.is_cuda(), op, ": expected CUDA tensors");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && cu_seqlens.device() == q.device(), op,
              ": tensors are on different devices");
  // Below sm_80 the kernels' mma.sync path is __trap(), which would cost the process its CUDA context.
  int major = 0, minor = 0;
  FASTBERT_CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()), op);
  FASTBERT_CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.device().index()), op);
  TORCH_CHECK(major >= 8, op, ": the attention kernels need compute capability 8.0 or newer; ", q.device(), " is ",
              major, ".", minor, " (fastbert.ops.attention runs the PyTorch twin there)");
  TORCH_CHECK(q.dim() == 3, op, ": q must be [total_tokens, heads, head_dim], got ", q.dim(), "-d");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op, ": q, k, v must have one shape");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must have one dtype");
  const int64_t d = q.size(2);
  TORCH_CHECK(d == 32 || d == 64 || d == 128, op, ": head_dim must be 32, 64 or 128, got ", d);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.scalar_type() == at::kInt, op,
              ": cu_seqlens must be a 1-d int32 tensor of batch + 1 offsets");
  TORCH_CHECK(cu_seqlens.size(0) - 1 <= 65535 && q.size(1) <= 65535, op, ": batch and heads must be <= 65535");
  TORCH_CHECK(q.size(0) < (int64_t(1) << 31), op, ": at most 2^31 - 1 tokens");
  TORCH_CHECK(max_seqlen >= 0 && max_seqlen <= q.size(0), op, ": max_seqlen ", max_seqlen, " out of range");
}

// The fields the forward and the backward share, from the (already checked) packed tensors.
void set_attention_problem(fastbert::AttentionProblem& p, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                           double dropout_p, int64_t seed, int64_t offset, const char* op) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  p.q_row_stride = q.stride(0), p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0), p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0), p.v_head_stride = v.stride(1);
  p.batch = static_cast<int>(cu_seqlens.size(0) - 1);
  p.heads = static_cast<int>(q.size(1));
  p.head_dim = static_cast<int>(q.size(2));
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.total_tokens = q.size(0);
  p.scale = static_cast<float>(scale);
  p.dropout = attention_dropout(dropout_p, seed, offset);
  p.dtype = attention_dtype(q, op);
  p.stream = current_stream(q);
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in, const at::Tensor& cu_seqlens_in,
                                                             int64_t max_seqlen, double scale, double dropout_p,
                                                             int64_t seed, int64_t offset) {
  check_attention_inputs(q_in, k_in, v_in, cu_seqlens_in, max_seqlen, "attention_varlen_fwd");
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = attention_operand(q_in), k = attention_operand(k_in), v = attention_operand(v_in);
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  fastbert::AttentionFwdParams p{};
  set_attention_problem(p, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset, "attention_varlen_fwd");
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  FASTBERT_CHECK_CUDA(fastbert::attention_fwd(p), "attention_varlen_fwd");
  return {out, lse};
}

// delta = rowsum(dout * out) over head_dim, fp32 [heads, total], by the preprocessing kernel.
at::Tensor attention_bwd_delta_into(const at::Tensor& dout, const at::Tensor& out, const char* op) {
  const at::Tensor d = attention_operand(dout), o = attention_operand(out);
  at::Tensor delta = at::empty({d.size(1), d.size(0)}, d.options().dtype(at::kFloat));
  fastbert::AttentionDeltaParams p{};
  p.dout = d.data_ptr();
  p.out = o.data_ptr();
  p.dout_row_stride = d.stride(0), p.dout_head_stride = d.stride(1);
  p.out_row_stride = o.stride(0), p.out_head_stride = o.stride(1);
  p.delta = delta.data_ptr<float>();
  p.total_tokens = d.size(0);
  p.heads = static_cast<int>(d.size(1));
  p.head_dim = static_cast<int>(d.size(2));
  p.dtype = attention_dtype(d, op);
  p.stream = current_stream(d);
  FASTBERT_CHECK_CUDA(fastbert::attention_bwd_delta(p), op);
  return delta;
}

at::Tensor attention_bwd_delta_cuda(const at::Tensor& dout, const at::Tensor& out) {
  TORCH_CHECK(dout.is_cuda() && out.is_cuda() && dout.device() == out.device(),
              "attention_bwd_delta: expected dout and out on one CUDA device");
  TORCH_CHECK(dout.dim() == 3 && out.sizes() == dout.sizes(), "attention_bwd_delta: dout and out must be one "
              "[total_tokens, heads, head_dim] shape, got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK(out.scalar_type() == dout.scalar_type(), "attention_bwd_delta: dout and out must have one dtype");
  const int64_t d = dout.size(2);
  TORCH_CHECK(d == 32 || d == 64 || d == 128, "attention_bwd_delta: head_dim must be 32, 64 or 128, got ", d);
  TORCH_CHECK(dout.size(1) <= 65535 && dout.size(0) < (int64_t(1) << 31), "attention_bwd_delta: too many heads or tokens");
  c10::cuda::CUDAGuard guard(dout.device());
  return attention_bwd_delta_into(dout, out, "attention_bwd_delta");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse_in, const at::Tensor& cu_seqlens_in, int64_t max_seqlen,
    double scale, double dropout_p, int64_t seed, int64_t offset) {
  check_attention_inputs(q_in, k_in, v_in, cu_seqlens_in, max_seqlen, "attention_varlen_bwd");
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out.sizes() == q_in.sizes(),
              "attention_varlen_bwd: dout and out must have the shape of q");
  TORCH_CHECK(dout_in.device() == q_in.device() && out.device() == q_in.device() && lse_in.device() == q_in.device(),
              "attention_varlen_bwd: tensors are on different devices");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 2 && lse_in.size(0) == q_in.size(1) &&
                  lse_in.size(1) == q_in.size(0),
              "attention_varlen_bwd: lse must be float32 [heads, total_tokens]");
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = attention_operand(q_in), k = attention_operand(k_in), v = attention_operand(v_in);
  const at::Tensor dout = attention_operand(dout_in.to(q.scalar_type()).contiguous());  // kernel: contiguous
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const at::Tensor delta = attention_bwd_delta_into(dout, out.to(q.scalar_type()), "attention_varlen_bwd");
  // fp32, zeroed, with kAttentionBlockM rows past the last token (the kernel adds exact zeros there)
  at::Tensor dq_accum = at::zeros({q.size(0) + fastbert::kAttentionBlockM, q.size(1), q.size(2)},
                                  q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty(q.sizes(), q.options());
  at::Tensor dv = at::empty(q.sizes(), q.options());
  fastbert::AttentionBwdParams p{};
  set_attention_problem(p, q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, seed, offset, "attention_varlen_bwd");
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  FASTBERT_CHECK_CUDA(fastbert::attention_bwd(p), "attention_varlen_bwd");
  return {dq_accum.narrow(0, 0, q.size(0)).to(q.scalar_type()), dk, dv};
}

at::Tensor attention_dropout_mask_cuda(const at::Tensor& cu_seqlens_in, int64_t heads, int64_t max_seqlen,
                                       double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(cu_seqlens_in.is_cuda() && cu_seqlens_in.dim() == 1 && cu_seqlens_in.size(0) >= 1 &&
                  cu_seqlens_in.scalar_type() == at::kInt,
              "attention_dropout_mask: cu_seqlens must be a 1-d int32 CUDA tensor");
  TORCH_CHECK(heads >= 0 && max_seqlen >= 0, "attention_dropout_mask: heads and max_seqlen must be >= 0");
  c10::cuda::CUDAGuard guard(cu_seqlens_in.device());
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const int64_t batch = cu_seqlens.size(0) - 1;
  at::Tensor keep = at::empty({batch, heads, max_seqlen, max_seqlen}, cu_seqlens.options().dtype(at::kBool));
  fastbert::AttentionDropoutMaskParams p{};
  p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  p.keep = reinterpret_cast<uint8_t*>(keep.data_ptr<bool>());
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.max_seqlen = static_cast<int>(max_seqlen);
  p.dropout = attention_dropout(dropout_p, seed, offset);
  p.stream = current_stream(cu_seqlens);
  FASTBERT_CHECK_CUDA(fastbert::attention_dropout_mask(p), "attention_dropout_mask");
  return keep;
}
// ---- end attention ------------------------------------------------------------------------

// ---- layernorm, cross_entropy ---------------------------------------------------------------
fastbert::DType float_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastbert::DType::kFloat32;
    case at::kHalf: return fastbert::DType::kFloat16;
    case at::kBFloat16: return fastbert::DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Checks a per-feature parameter and returns it as a contiguous fp32 tensor (or undefined).
at::Tensor fp32_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* what) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->device() == x.device(), "layernorm: ", what, " is on ", p->device(), ", x on ", x.device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), "layernorm: ", what, " must have shape [",
              x.size(-1), "], got ", p->sizes());
  return p->to(at::kFloat).contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 1, "layernorm_fwd: x must be a CUDA tensor with at least 1 dim");
  const fastbert::DType dtype = float_dtype(x_in, "layernorm_fwd");
  const int64_t hidden = x_in.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= fastbert::kLayerNormMaxHidden, "layernorm_fwd: hidden size ", hidden,
              " outside [1, ", fastbert::kLayerNormMaxHidden, "]");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor residual;
  if (residual_in.has_value() && residual_in->defined()) {
    TORCH_CHECK(residual_in->sizes() == x_in.sizes() && residual_in->scalar_type() == x_in.scalar_type() &&
                    residual_in->device() == x_in.device(),
                "layernorm_fwd: residual must match x in shape, dtype and device");
    residual = residual_in->contiguous();
  }
  const at::Tensor weight = fp32_param(weight_in, x, "weight"), bias = fp32_param(bias_in, x, "bias");
  const int64_t rows = x.numel() / hidden;
  at::Tensor y = at::empty_like(x);
  at::Tensor sum = residual.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  fastbert::LayerNormFwdParams p{};
  p.x = x.data_ptr();
  p.residual = residual.defined() ? residual.data_ptr() : nullptr;
  p.weight = ptr_or_null(weight);
  p.bias = ptr_or_null(bias);
  p.y = y.data_ptr();
  p.sum = residual.defined() ? sum.data_ptr() : nullptr;
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.hidden = hidden;
  p.eps = static_cast<float>(eps);
  p.dtype = dtype;
  p.stream = current_stream(x);
  FASTBERT_CHECK_CUDA(fastbert::layernorm_fwd(p), "layernorm_fwd");
  return {y, sum, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& h_in,
                                                                  const at::Tensor& mean, const at::Tensor& rstd,
                                                                  const std::optional<at::Tensor>& weight_in) {
  TORCH_CHECK(dy_in.is_cuda() && h_in.is_cuda(), "layernorm_bwd: expected CUDA tensors");
  TORCH_CHECK(dy_in.sizes() == h_in.sizes() && dy_in.scalar_type() == h_in.scalar_type(),
              "layernorm_bwd: dy and h must match in shape and dtype");
  const fastbert::DType dtype = float_dtype(h_in, "layernorm_bwd");
  const int64_t hidden = h_in.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= fastbert::kLayerNormMaxHidden, "layernorm_bwd: hidden size out of range");
  const int64_t rows = h_in.numel() / hidden;
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == rows &&
                  rstd.numel() == rows, "layernorm_bwd: mean and rstd must be fp32 with one value per row");
  c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor dy = dy_in.contiguous(), h = h_in.contiguous();
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const at::Tensor weight = fp32_param(weight_in, h, "weight");
  const int64_t partials = fastbert::layernorm_bwd_num_partials(rows, hidden, dtype);
  at::Tensor dx = at::empty_like(h);
  at::Tensor workspace = at::empty({2, partials, hidden}, h.options().dtype(at::kFloat));
  at::Tensor dweight = at::empty({hidden}, h.options().dtype(at::kFloat));
  at::Tensor dbias = at::empty({hidden}, h.options().dtype(at::kFloat));
  fastbert::LayerNormBwdParams p{};
  p.dy = dy.data_ptr();
  p.h = h.data_ptr();
  p.mean = mean_c.data_ptr<float>();
  p.rstd = rstd_c.data_ptr<float>();
  p.weight = ptr_or_null(weight);
  p.dx = dx.data_ptr();
  p.partial = workspace.data_ptr<float>();
  p.dweight = dweight.data_ptr<float>();
  p.dbias = dbias.data_ptr<float>();
  p.rows = rows;
  p.hidden = hidden;
  p.dtype = dtype;
  p.stream = current_stream(h);
  FASTBERT_CHECK_CUDA(fastbert::layernorm_bwd(p), "layernorm_bwd");
  return {dx, dweight, dbias};
}

void check_logits_labels(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.is_cuda() && labels.device() == logits.device(), op, ": expected CUDA tensors on one device");
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-d [rows, classes], got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": labels must be [", logits.size(0),
              "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                                          int64_t ignore_index) {
  check_logits_labels(logits_in, labels_in, "cross_entropy_fwd");
  const fastbert::DType dtype = float_dtype(logits_in, "cross_entropy_fwd");
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = dense_rows(logits_in);
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) > 0, "cross_entropy_fwd: logits have no classes");
  fastbert::CrossEntropyFwdParams p{};
  p.logits = logits.data_ptr();
  p.labels = labels.data_ptr<int64_t>();
  p.loss = loss.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.rows = logits.size(0);
  p.classes = logits.size(1);
  p.row_stride = logits.stride(0);
  p.ignore_index = ignore_index;
  p.dtype = dtype;
  p.stream = current_stream(logits);
  FASTBERT_CHECK_CUDA(fastbert::cross_entropy_fwd(p), "cross_entropy_fwd");
  return {loss, lse};
}

// grad may be logits itself (the in-place variant).
void cross_entropy_bwd_into(const at::Tensor& grad_loss_in, const at::Tensor& logits, const at::Tensor& labels_in,
                            const at::Tensor& lse_in, int64_t ignore_index, const at::Tensor& grad, const char* op) {
  check_logits_labels(logits, labels_in, op);
  const int64_t rows = logits.size(0);
  TORCH_CHECK(grad_loss_in.numel() == rows && lse_in.numel() == rows && lse_in.scalar_type() == at::kFloat, op,
              ": grad_loss and lse (fp32) must have one value per row");
  TORCH_CHECK(grad_loss_in.device() == logits.device() && lse_in.device() == logits.device(), op,
              ": grad_loss and lse must be on the device of logits");
  const at::Tensor grad_loss = grad_loss_in.to(at::kFloat).contiguous();
  const at::Tensor labels = labels_in.to(at::kLong).contiguous();
  const at::Tensor lse = lse_in.contiguous();
  fastbert::CrossEntropyBwdParams p{};
  p.grad_loss = grad_loss.data_ptr<float>();
  p.logits = logits.data_ptr();
  p.grad = grad.data_ptr();
  p.labels = labels.data_ptr<int64_t>();
  p.lse = lse.data_ptr<float>();
  p.rows = rows;
  p.classes = logits.size(1);
  p.logits_row_stride = logits.stride(0);
  p.grad_row_stride = grad.stride(0);
  p.ignore_index = ignore_index;
  p.dtype = float_dtype(logits, op);
  p.stream = current_stream(logits);
  FASTBERT_CHECK_CUDA(fastbert::cross_entropy_bwd(p), op);
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits_in, const at::Tensor& labels,
                                  const at::Tensor& lse, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.dim() == 2 ? dense_rows(logits_in) : logits_in;
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  cross_entropy_bwd_into(grad_loss, logits, labels, lse, ignore_index, grad, "cross_entropy_bwd");
  return grad;
}

void cross_entropy_bwd_inplace_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                    const at::Tensor& lse, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "cross_entropy_bwd_: in place needs logits with unit "
              "stride along classes");
  cross_entropy_bwd_into(grad_loss, logits, labels, lse, ignore_index, logits, "cross_entropy_bwd_");
}
// ---- end layernorm, cross_entropy -----------------------------------------------------------

// ---- bias_gelu, bias_dropout_residual_layernorm -------------------------------------------------
// A per-feature parameter of `op` as a contiguous fp32 tensor on x's device (undefined if absent).
at::Tensor feature_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* op, const char* what) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->device() == x.device(), op, ": ", what, " is on ", p->device(), ", x on ", x.device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), op, ": ", what, " must have shape [", x.size(-1),
              "], got ", p->sizes());
  return p->to(at::kFloat).contiguous();
}

fastbert::GeluKind gelu_kind(c10::string_view approximate, const char* op) {
  if (approximate == "none") return fastbert::GeluKind::kErf;
  TORCH_CHECK(approximate == "tanh", op, ": approximate must be 'none' or 'tanh', got '", std::string(approximate), "'");
  return fastbert::GeluKind::kTanh;
}

at::Tensor bias_gelu_fwd_cuda(const at::Tensor& x_in, const at::Tensor& bias_in, c10::string_view approximate) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 1 && x_in.size(-1) >= 1,
              "bias_gelu_fwd: x must be a CUDA tensor with a non-empty last dimension");
  const fastbert::GeluKind kind = gelu_kind(approximate, "bias_gelu_fwd");
  const fastbert::DType dtype = float_dtype(x_in, "bias_gelu_fwd");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = feature_param(bias_in, x, "bias_gelu_fwd", "bias");
  at::Tensor y = at::empty_like(x);
  fastbert::BiasGeluFwdParams p{};
  p.x = x.data_ptr();
  p.bias = bias.data_ptr<float>();
  p.y = y.data_ptr();
  p.cols = x.size(-1);
  p.rows = x.numel() / p.cols;
  p.kind = kind;
  p.dtype = dtype;
  p.stream = current_stream(x);
  FASTBERT_CHECK_CUDA(fastbert::bias_gelu_fwd(p), "bias_gelu_fwd");
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                      const at::Tensor& bias_in, c10::string_view approximate) {
  TORCH_CHECK(dy_in.is_cuda() && x_in.is_cuda() && dy_in.device() == x_in.device(),
              "bias_gelu_bwd: expected CUDA tensors on one device");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type() && x_in.dim() >= 1 &&
                  x_in.size(-1) >= 1, "bias_gelu_bwd: dy and x must match in shape and dtype");
  const fastbert::GeluKind kind = gelu_kind(approximate, "bias_gelu_bwd");
  const fastbert::DType dtype = float_dtype(x_in, "bias_gelu_bwd");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor bias = feature_param(bias_in, x, "bias_gelu_bwd", "bias");
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  const int64_t partials = fastbert::bias_gelu_bwd_num_partials(rows, cols, dtype);
  at::Tensor dx = at::empty_like(x);
  at::Tensor workspace = at::empty({partials, cols}, x.options().dtype(at::kFloat));
  at::Tensor dbias = at::empty({cols}, x.options().dtype(bias_in.scalar_type()));
  fastbert::BiasGeluBwdParams p{};
  p.dy = dy.data_ptr();
  p.x = x.data_ptr();
  p.bias = bias.data_ptr<float>();
  p.dx = dx.data_ptr();
  p.partial = workspace.data_ptr<float>();
  p.dbias = dbias.data_ptr();
  p.dbias_dtype = float_dtype(bias_in, "bias_gelu_bwd");
  p.rows = rows;
  p.cols = cols;
  p.kind = kind;
  p.dtype = dtype;
  p.stream = current_stream(x);
  FASTBERT_CHECK_CUDA(fastbert::bias_gelu_bwd(p), "bias_gelu_bwd");
  return {dx, dbias};
}

fastbert::RowDropout row_dropout(double dropout_p, int64_t seed, int64_t offset, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  return fastbert::make_row_dropout(dropout_p, static_cast<uint64_t>(seed), static_cast<uint32_t>(offset));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_dropout_residual_layernorm_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in, const at::Tensor& residual_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& ln_bias_in, double eps,
    double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "bias_dropout_residual_layernorm_fwd";
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() >= 1, op, ": x must be a CUDA tensor with at least 1 dim");
  TORCH_CHECK(residual_in.sizes() == x_in.sizes() && residual_in.scalar_type() == x_in.scalar_type() &&
                  residual_in.device() == x_in.device(), op, ": residual must match x in shape, dtype and device");
  const fastbert::DType dtype = float_dtype(x_in, op);
  const int64_t hidden = x_in.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= fastbert::kBdrlnMaxHidden, op, ": hidden size ", hidden, " outside [1, ",
              fastbert::kBdrlnMaxHidden, "]");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), residual = residual_in.contiguous();
  const at::Tensor bias = feature_param(bias_in, x, op, "bias"), weight = feature_param(weight_in, x, op, "weight"),
                   ln_bias = feature_param(ln_bias_in, x, op, "ln_bias");
  const int64_t rows = x.numel() / hidden;
  at::Tensor y = at::empty_like(x), h = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  fastbert::BdrlnFwdParams p{};
  p.x = x.data_ptr();
  p.bias = ptr_or_null(bias);
  p.residual = residual.data_ptr();
  p.residual2 = nullptr;
  p.weight = ptr_or_null(weight);
  p.beta = ptr_or_null(ln_bias);
  p.y = y.data_ptr();
  p.h = h.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.hidden = hidden;
  p.eps = static_cast<float>(eps);
  p.dropout = row_dropout(dropout_p, seed, offset, op);
  p.dropout_after_norm = false;
  p.dtype = dtype;
  p.stream = current_stream(x);
  FASTBERT_CHECK_CUDA(fastbert::bdrln_fwd(p), op);
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_dropout_residual_layernorm_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& h_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& weight_in, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "bias_dropout_residual_layernorm_bwd";
  TORCH_CHECK(dy_in.is_cuda() && h_in.is_cuda() && dy_in.device() == h_in.device() && h_in.dim() >= 1, op,
              ": expected CUDA tensors on one device");
  TORCH_CHECK(dy_in.sizes() == h_in.sizes() && dy_in.scalar_type() == h_in.scalar_type(), op,
              ": dy and h must match in shape and dtype");
  const fastbert::DType dtype = float_dtype(h_in, op);
  const int64_t hidden = h_in.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= fastbert::kBdrlnMaxHidden, op, ": hidden size out of range");
  const int64_t rows = h_in.numel() / hidden;
  TORCH_CHECK(mean_in.scalar_type() == at::kFloat && rstd_in.scalar_type() == at::kFloat && mean_in.numel() == rows &&
                  rstd_in.numel() == rows && mean_in.device() == h_in.device() && rstd_in.device() == h_in.device(),
              op, ": mean and rstd must be fp32 with one value per row, on h's device");
  c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor dy = dy_in.contiguous(), h = h_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor weight = feature_param(weight_in, h, op, "weight");
  const int64_t partials = fastbert::bdrln_bwd_num_partials(rows, hidden, dtype);
  at::Tensor dx = at::empty_like(h), dresidual = at::empty_like(h);
  at::Tensor workspace = at::empty({3, partials, hidden}, h.options().dtype(at::kFloat));
  const bool has_weight = weight_in.has_value() && weight_in->defined();
  const at::ScalarType grad_type = has_weight ? weight_in->scalar_type() : at::kFloat;
  at::Tensor dweight = at::empty({hidden}, h.options().dtype(grad_type));
  at::Tensor dln_bias = at::empty({hidden}, h.options().dtype(grad_type));
  at::Tensor dbias = at::empty({hidden}, h.options().dtype(grad_type));
  fastbert::BdrlnBwdParams p{};
  p.dy = dy.data_ptr();
  p.h = h.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.weight = ptr_or_null(weight);
  p.dx = dx.data_ptr();
  p.dresidual = dresidual.data_ptr();
  p.partial = workspace.data_ptr<float>();
  p.dweight = dweight.data_ptr();
  p.dbeta = dln_bias.data_ptr();
  p.dbias = dbias.data_ptr();
  p.grad_dtype = has_weight ? float_dtype(*weight_in, op) : fastbert::DType::kFloat32;
  p.rows = rows;
  p.hidden = hidden;
  p.dropout = row_dropout(dropout_p, seed, offset, op);
  p.dropout_after_norm = false;
  p.dtype = dtype;
  p.stream = current_stream(h);
  FASTBERT_CHECK_CUDA(fastbert::bdrln_bwd(p), op);
  return {dx, dresidual, dweight, dln_bias, dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> embeddings_layernorm_dropout_fwd_cuda(
    const at::Tensor& a_in, const at::Tensor& b_in, const std::optional<at::Tensor>& c_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in, double eps,
    double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "embeddings_layernorm_dropout_fwd";
  TORCH_CHECK(a_in.is_cuda() && a_in.dim() >= 1, op, ": a must be a CUDA tensor with at least 1 dim");
  const bool has_c = c_in.has_value() && c_in->defined();
  for (const at::Tensor* t : {&b_in, has_c ? &*c_in : &b_in})
    TORCH_CHECK(t->sizes() == a_in.sizes() && t->scalar_type() == a_in.scalar_type() && t->device() == a_in.device(),
                op, ": b and c must match a in shape, dtype and device");
  const fastbert::DType dtype = float_dtype(a_in, op);
  const int64_t hidden = a_in.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= fastbert::kBdrlnMaxHidden, op, ": hidden size ", hidden, " outside [1, ",
              fastbert::kBdrlnMaxHidden, "]");
  c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor c = has_c ? c_in->contiguous() : at::Tensor();
  const at::Tensor weight = feature_param(weight_in, a, op, "weight"), bias = feature_param(bias_in, a, op, "bias");
  const int64_t rows = a.numel() / hidden;
  at::Tensor y = at::empty_like(a), h = at::empty_like(a);
  at::Tensor mean = at::empty({rows}, a.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, a.options().dtype(at::kFloat));
  fastbert::BdrlnFwdParams p{};
  p.x = a.data_ptr();
  p.bias = nullptr;
  p.residual = b.data_ptr();
  p.residual2 = has_c ? c.data_ptr() : nullptr;
  p.weight = ptr_or_null(weight);
  p.beta = ptr_or_null(bias);
  p.y = y.data_ptr();
  p.h = h.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.hidden = hidden;
  p.eps = static_cast<float>(eps);
  p.dropout = row_dropout(dropout_p, seed, offset, op);
  p.dropout_after_norm = true;
  p.dtype = dtype;
  p.stream = current_stream(a);
  FASTBERT_CHECK_CUDA(fastbert::bdrln_fwd(p), op);
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embeddings_layernorm_dropout_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& h_in, const at::Tensor& mean_in, const at::Tensor& rstd_in,
    const std::optional<at::Tensor>& weight_in, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "embeddings_layernorm_dropout_bwd";
  TORCH_CHECK(dy_in.is_cuda() && h_in.is_cuda() && dy_in.device() == h_in.device() && h_in.dim() >= 1, op,
              ": expected CUDA tensors on one device");
  TORCH_CHECK(dy_in.sizes() == h_in.sizes() && dy_in.scalar_type() == h_in.scalar_type(), op,
              ": dy and h must match in shape and dtype");
  const fastbert::DType dtype = float_dtype(h_in, op);
  const int64_t hidden = h_in.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= fastbert::kBdrlnMaxHidden, op, ": hidden size out of range");
  const int64_t rows = h_in.numel() / hidden;
  TORCH_CHECK(mean_in.scalar_type() == at::kFloat && rstd_in.scalar_type() == at::kFloat && mean_in.numel() == rows &&
                  rstd_in.numel() == rows && mean_in.device() == h_in.device() && rstd_in.device() == h_in.device(),
              op, ": mean and rstd must be fp32 with one value per row, on h's device");
  c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor dy = dy_in.contiguous(), h = h_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const at::Tensor weight = feature_param(weight_in, h, op, "weight");
  const int64_t partials = fastbert::bdrln_bwd_num_partials(rows, hidden, dtype);
  at::Tensor dh = at::empty_like(h);
  at::Tensor workspace = at::empty({3, partials, hidden}, h.options().dtype(at::kFloat));
  // fp32 sums written in weight's dtype (fp32 without a weight), as bias_dropout_residual_layernorm_bwd
  const bool has_weight = weight_in.has_value() && weight_in->defined();
  const at::ScalarType grad_type = has_weight ? weight_in->scalar_type() : at::kFloat;
  at::Tensor dweight = at::empty({hidden}, h.options().dtype(grad_type));
  at::Tensor dbias = at::empty({hidden}, h.options().dtype(grad_type));
  at::Tensor unused = at::empty({hidden}, h.options().dtype(grad_type));  // the column sum of dx: no bias here
  fastbert::BdrlnBwdParams p{};
  p.dy = dy.data_ptr();
  p.h = h.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.weight = ptr_or_null(weight);
  p.dx = nullptr;
  p.dresidual = dh.data_ptr();
  p.partial = workspace.data_ptr<float>();
  p.dweight = dweight.data_ptr();
  p.dbeta = dbias.data_ptr();
  p.dbias = unused.data_ptr();
  p.grad_dtype = has_weight ? float_dtype(*weight_in, op) : fastbert::DType::kFloat32;
  p.rows = rows;
  p.hidden = hidden;
  p.dropout = row_dropout(dropout_p, seed, offset, op);
  p.dropout_after_norm = true;
  p.dtype = dtype;
  p.stream = current_stream(h);
  FASTBERT_CHECK_CUDA(fastbert::bdrln_bwd(p), op);
  return {dh, dweight, dbias};
}
// ---- end bias_gelu, bias_dropout_residual_layernorm ---------------------------------------------

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  // ---- attention ----
  m.impl("attention_varlen_fwd", &attention_varlen_fwd_cuda);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd_cuda);
  m.impl("attention_dropout_mask", &attention_dropout_mask_cuda);
  m.impl("attention_bwd_delta", &attention_bwd_delta_cuda);
  // ---- end attention ----
  // ---- layernorm, cross_entropy ----
  m.impl("layernorm_fwd", &layernorm_fwd_cuda);
  m.impl("layernorm_bwd", &layernorm_bwd_cuda);
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cuda);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_inplace_cuda);
  // ---- end layernorm, cross_entropy ----
  // ---- bias_gelu, bias_dropout_residual_layernorm ----
  m.impl("bias_gelu_fwd", &bias_gelu_fwd_cuda);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd_cuda);
  m.impl("bias_dropout_residual_layernorm_fwd", &bias_dropout_residual_layernorm_fwd_cuda);
  m.impl("bias_dropout_residual_layernorm_bwd", &bias_dropout_residual_layernorm_bwd_cuda);
  m.impl("embeddings_layernorm_dropout_fwd", &embeddings_layernorm_dropout_fwd_cuda);
  m.impl("embeddings_layernorm_dropout_bwd", &embeddings_layernorm_dropout_bwd_cuda);
  // ---- end bias_gelu, bias_dropout_residual_layernorm ----
}
#endif  // FASTBERT_WITH_CUDA
