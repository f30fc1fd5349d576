// The one file that sees torch: it declares every fastbert op with TORCH_LIBRARY, checks and
// unpacks tensors into the plain params structs of csrc/<op>/<op>.h, and launches on the
// current stream. Python (fastbert/ops/*.py) registers the fake kernels, the autograd and the
// pure-PyTorch twins (as the CPU kernels).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef FASTBERT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "gather/gather.h"
#endif

// `import fastbert._C` loads this library, which registers the ops below in torch.ops.fastbert.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastbert kernels; the ops live in torch.ops.fastbert", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastbert, m) {
  // out[i] = x[index[i]]; x is [rows, hidden], index is 1-d int64 with values in [0, rows).
  m.def("gather_rows(Tensor x, Tensor index) -> Tensor");
  // out = zeros(num_rows, hidden); out[index[i]] = src[i]; index values unique.
  m.def("scatter_rows(Tensor src, Tensor index, SymInt num_rows) -> Tensor");
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

}  // namespace

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}
#endif  // FASTBERT_WITH_CUDA
