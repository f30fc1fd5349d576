// Softmax cross-entropy, forward and backward: one thread block per row (grid-stride over rows).
// Rows are read with 16-byte loads: a few scalar elements first up to the next 16-byte boundary
// (a vocabulary of 30522 half-precision logits leaves rows 4 bytes off), then packs, then the
// scalar tail, so any vocabulary size and row stride works. All math is fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cross_entropy/cross_entropy.h"
#include "device_utils.cuh"

namespace fastbert {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxThreads = kCrossEntropyMaxThreads;  // cross_entropy.h

// Running (max, sum of exp(x - max)) of an online softmax.
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};  // both empty (or all -inf): avoid (-inf) - (-inf)
  return {m, a.s * exp2f((a.m - m) * kLog2e) + b.s * exp2f((b.m - m) * kLog2e)};
}

// The block-wide combination, the same in every thread. blockDim.x is a multiple of 32.
__device__ __forceinline__ MaxSum block_combine(MaxSum v, MaxSum* smem) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = combine(v, {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  MaxSum total{-INFINITY, 0.f};
  for (int w = 0; w < num_warps; ++w) total = combine(total, smem[w]);
  __syncthreads();
  return total;
}

// Visits the n elements of a row: scalar(i) for the unaligned head and the tail, vector(i) for
// the 16-byte packs starting at element i. `vectorize` false visits every element as a scalar.
template <typename T, typename Scalar, typename Vector>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t n, bool vectorize, Scalar scalar,
                                                Vector vector) {
  constexpr int VEC = 16 / sizeof(T);
  int64_t head = n;
  if (vectorize) {
    const int64_t off = static_cast<int64_t>((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16) / sizeof(T);
    head = off < n ? off : n;
  }
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) scalar(i);
  if (head == n) return;
  const int64_t packs = (n - head) / VEC;
#pragma unroll 4
  for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) vector(head + k * VEC);
  for (int64_t i = head + packs * VEC + threadIdx.x; i < n; i += blockDim.x) scalar(i);
}

template <typename T>
__global__ void cross_entropy_fwd_kernel(CrossEntropyFwdParams p) {
  constexpr int VEC = 16 / sizeof(T);
  using P = Pack<T, VEC>;
  __shared__ MaxSum smem[32];
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t label = p.labels[row];
    if (label == p.ignore_index) {  // the same branch for the whole block
      if (threadIdx.x == 0) p.loss[row] = p.lse[row] = 0.f;
      continue;
    }
    const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
    MaxSum acc{-INFINITY, 0.f};
    for_each_in_row(x, p.classes, true,
        [&](int64_t i) { acc = combine(acc, {to_float(x[i]), 1.f}); },
        [&](int64_t i) {
          const P pack = *reinterpret_cast<const P*>(x + i);
          float v[VEC], m = acc.m;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            v[j] = to_float(pack.v[j]);
            m = fmaxf(m, v[j]);
          }
          if (m == -INFINITY) return;
          float s = acc.s * exp2f((acc.m - m) * kLog2e);
#pragma unroll
          for (int j = 0; j < VEC; ++j) s += exp2f((v[j] - m) * kLog2e);
          acc = {m, s};
        });
    acc = block_combine(acc, smem);
    if (threadIdx.x == 0) {
      const float lse = acc.m + logf(acc.s);
      p.lse[row] = lse;
      // the public function range-checks labels; a bad one still never reads out of bounds
      p.loss[row] = (label >= 0 && label < p.classes) ? lse - to_float(x[label]) : NAN;
    }
  }
}

template <typename T>
__global__ void cross_entropy_bwd_kernel(CrossEntropyBwdParams p) {
  constexpr int VEC = 16 / sizeof(T);
  using P = Pack<T, VEC>;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t label = p.labels[row];
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* g = static_cast<T*>(p.grad) + row * p.grad_row_stride;
    // packs need the same 16-byte phase in both rows (always so in place, or both contiguous)
    const bool vectorize = reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(g) % 16;
    if (label == p.ignore_index) {
      for_each_in_row(g, p.classes, true, [&](int64_t i) { g[i] = from_float<T>(0.f); },
                      [&](int64_t i) { *reinterpret_cast<P*>(g + i) = P{}; });
      continue;
    }
    const float scale = p.grad_loss[row];
    const float shift = p.lse[row] * kLog2e;
    auto grad_of = [&](float v, int64_t c) {
      const float prob = exp2f(fmaf(v, kLog2e, -shift));
      return scale * (c == label ? prob - 1.f : prob);
    };
    for_each_in_row(x, p.classes, vectorize,
        [&](int64_t i) { g[i] = from_float<T>(grad_of(to_float(x[i]), i)); },
        [&](int64_t i) {
          const P in = *reinterpret_cast<const P*>(x + i);
          P out;
#pragma unroll
          for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(grad_of(to_float(in.v[j]), i + j));
          *reinterpret_cast<P*>(g + i) = out;
        });
  }
}

int threads_for(int64_t classes, DType dtype) {
  const int64_t packs = ceil_div(classes, 16 / dtype_size(dtype));
  const int64_t t = ceil_div(packs, 32) * 32;
  return static_cast<int>(t < kMaxThreads ? t : kMaxThreads);
}

int grid_for(int64_t rows) { return static_cast<int>(rows < (1 << 20) ? rows : (1 << 20)); }

}  // namespace

cudaError_t cross_entropy_fwd(const CrossEntropyFwdParams& p) {
  if (p.rows == 0) return cudaSuccess;
  if (p.classes < 1) return cudaErrorInvalidValue;
  const int threads = threads_for(p.classes, p.dtype), grid = grid_for(p.rows);
  switch (p.dtype) {
    case DType::kFloat32: FASTBERT_LAUNCH(grid, threads, 0, p.stream, cross_entropy_fwd_kernel<float>)(p); break;
    case DType::kFloat16: FASTBERT_LAUNCH(grid, threads, 0, p.stream, cross_entropy_fwd_kernel<__half>)(p); break;
    default: FASTBERT_LAUNCH(grid, threads, 0, p.stream, cross_entropy_fwd_kernel<__nv_bfloat16>)(p); break;
  }
  return cudaGetLastError();
}

cudaError_t cross_entropy_bwd(const CrossEntropyBwdParams& p) {
  if (p.rows == 0 || p.classes == 0) return cudaSuccess;
  const int threads = threads_for(p.classes, p.dtype), grid = grid_for(p.rows);
  switch (p.dtype) {
    case DType::kFloat32: FASTBERT_LAUNCH(grid, threads, 0, p.stream, cross_entropy_bwd_kernel<float>)(p); break;
    case DType::kFloat16: FASTBERT_LAUNCH(grid, threads, 0, p.stream, cross_entropy_bwd_kernel<__half>)(p); break;
    default: FASTBERT_LAUNCH(grid, threads, 0, p.stream, cross_entropy_bwd_kernel<__nv_bfloat16>)(p); break;
  }
  return cudaGetLastError();
}

}  // namespace fastbert
