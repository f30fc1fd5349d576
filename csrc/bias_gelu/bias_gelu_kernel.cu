// Bias + GELU, forward and backward (see bias_gelu.h). A block is 32 x 8 threads: threadIdx.x
// owns one pack of VEC columns (16 bytes when the column count and the pointers allow it, else
// one element), threadIdx.y strides over rows; the bias pack is loaded once per thread. The
// backward keeps its dbias column sums in fp32 registers, reduces them over threadIdx.y in
// shared memory and writes one workspace row per blockIdx.y.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bias_gelu/bias_gelu.h"
#include "device_utils.cuh"

namespace fastbert {
namespace {

constexpr int kTx = kBiasGeluThreadsX, kTy = kBiasGeluThreadsY;
constexpr float kSqrtHalf = 0.70710678118654752f;       // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;     // 1 / sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;    // sqrt(2 / pi)
constexpr float kTanhCoef = 0.044715f;
// The kind as an int template argument (kernel names then read bias_gelu_fwd_kernel<float, 4, 0>).
constexpr int kErf = static_cast<int>(GeluKind::kErf), kTanh = static_cast<int>(GeluKind::kTanh);

template <int K>
__device__ __forceinline__ float gelu(float z) {
  if (K == kErf) return 0.5f * z * (1.f + erff(z * kSqrtHalf));
  return 0.5f * z * (1.f + tanhf(kSqrt2OverPi * (z + kTanhCoef * z * z * z)));
}

template <int K>
__device__ __forceinline__ float gelu_grad(float z) {
  if (K == kErf) return 0.5f * (1.f + erff(z * kSqrtHalf)) + z * kInvSqrt2Pi * expf(-0.5f * z * z);
  const float t = tanhf(kSqrt2OverPi * (z + kTanhCoef * z * z * z));
  return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kTanhCoef * z * z);
}

// The VEC fp32 bias values of columns col0 .. col0 + VEC - 1 (16-byte loads when VEC % 4 == 0).
template <int VEC>
__device__ __forceinline__ void load_bias(const float* bias, int64_t col0, float (&b)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const Pack<float, 4> v = reinterpret_cast<const Pack<float, 4>*>(bias + col0)[q];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[4 * q + j] = v.v[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) b[j] = bias[col0 + j];
  }
}

template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kTx * kTy) bias_gelu_fwd_kernel(BiasGeluFwdParams p) {
  using P = Pack<T, VEC>;
  const int64_t packs = p.cols / VEC;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kTx + threadIdx.x;
  if (i >= packs) return;  // no barrier below
  float b[VEC];
  load_bias<VEC>(p.bias, i * VEC, b);
  const P* x = reinterpret_cast<const P*>(p.x);
  P* y = reinterpret_cast<P*>(p.y);
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kTy + threadIdx.y; row < p.rows;
       row += static_cast<int64_t>(gridDim.y) * kTy) {
    const P a = x[row * packs + i];
    P out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(gelu<K>(to_float(a.v[j]) + b[j]));
    y[row * packs + i] = out;
  }
}

template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kTx * kTy) bias_gelu_bwd_kernel(BiasGeluBwdParams p) {
  using P = Pack<T, VEC>;
  __shared__ float sums[kTy][kTx * VEC + 1];
  const int64_t packs = p.cols / VEC;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kTx + threadIdx.x;
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (i < packs) {
    float b[VEC];
    load_bias<VEC>(p.bias, i * VEC, b);
    const P* x = reinterpret_cast<const P*>(p.x);
    const P* dy = reinterpret_cast<const P*>(p.dy);
    P* dx = reinterpret_cast<P*>(p.dx);
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * kTy + threadIdx.y; row < p.rows;
         row += static_cast<int64_t>(gridDim.y) * kTy) {
      const P a = x[row * packs + i], g = dy[row * packs + i];
      P out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = to_float(g.v[j]) * gelu_grad<K>(to_float(a.v[j]) + b[j]);
        acc[j] += d;
        out.v[j] = from_float<T>(d);
      }
      dx[row * packs + i] = out;
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) sums[threadIdx.y][threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTx * VEC;
  float* partial = p.partial + static_cast<int64_t>(blockIdx.y) * p.cols;
  for (int c = threadIdx.y * kTx + threadIdx.x; c < kTx * VEC; c += kTx * kTy) {
    if (col0 + c < p.cols) {
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < kTy; ++r) s += sums[r][c];  // fixed order: deterministic
      partial[col0 + c] = s;
    }
  }
}

// dbias[c] = sum over the workspace rows; 32 columns x 8 row groups per block.
__global__ void __launch_bounds__(kTx * kTy) bias_gelu_dbias_kernel(const float* __restrict__ partial,
                                                                     int64_t num_partials, int64_t cols,
                                                                     void* __restrict__ dbias,
                                                                     DType dbias_dtype) {
  __shared__ float s[kTy][kTx + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTx + threadIdx.x;
  float v = 0.f;
  if (col < cols)
    for (int64_t r = threadIdx.y; r < num_partials; r += kTy) v += partial[r * cols + col];
  s[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int r = 1; r < kTy; ++r) v += s[r][threadIdx.x];
    store_as(dbias, dbias_dtype, col, v);
  }
}

// ----------------------------------------------------------------------------- launch config

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

int vec_for(int64_t cols, DType dtype, bool aligned) {
  const int wide = 16 / dtype_size(dtype);
  return aligned && cols % wide == 0 ? wide : 1;
}

int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    return 132;
  return sms;
}

// The grid over (column packs, rows): the row split fills the device, never more than the rows need.
dim3 grid_for(int64_t rows, int64_t cols, int vec, bool backward) {
  const int64_t col_blocks = ceil_div(ceil_div(cols, vec), kTx);
  const int64_t row_blocks = ceil_div(rows, kTy);
  int64_t split = backward ? ceil_div(static_cast<int64_t>(num_sms()) * kBiasGeluBlocksPerSm, col_blocks) : row_blocks;
  if (split > row_blocks) split = row_blocks;
  if (split > 65535) split = 65535;
  if (split < 1) split = 1;
  return dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(split));
}

template <typename T, int VEC>
void launch_fwd(const BiasGeluFwdParams& p, dim3 grid) {
  const dim3 block(kTx, kTy);
  if (p.kind == GeluKind::kErf)
    FASTBERT_LAUNCH(grid, block, 0, p.stream, bias_gelu_fwd_kernel<T, VEC, kErf>)(p);
  else
    FASTBERT_LAUNCH(grid, block, 0, p.stream, bias_gelu_fwd_kernel<T, VEC, kTanh>)(p);
}

template <typename T, int VEC>
void launch_bwd(const BiasGeluBwdParams& p, dim3 grid) {
  const dim3 block(kTx, kTy);
  if (p.kind == GeluKind::kErf)
    FASTBERT_LAUNCH(grid, block, 0, p.stream, bias_gelu_bwd_kernel<T, VEC, kErf>)(p);
  else
    FASTBERT_LAUNCH(grid, block, 0, p.stream, bias_gelu_bwd_kernel<T, VEC, kTanh>)(p);
}

template <typename T>
void fwd_for(const BiasGeluFwdParams& p, int vec, dim3 grid) {
  if (vec == 1) launch_fwd<T, 1>(p, grid);
  else launch_fwd<T, 16 / sizeof(T)>(p, grid);
}

template <typename T>
void bwd_for(const BiasGeluBwdParams& p, int vec, dim3 grid) {
  if (vec == 1) launch_bwd<T, 1>(p, grid);
  else launch_bwd<T, 16 / sizeof(T)>(p, grid);
}

}  // namespace

int64_t bias_gelu_bwd_num_partials(int64_t rows, int64_t cols, DType dtype) {
  if (rows <= 0 || cols <= 0) return 0;
  return grid_for(rows, cols, vec_for(cols, dtype, true), true).y;
}

cudaError_t bias_gelu_fwd(const BiasGeluFwdParams& p) {
  if (p.cols < 1 || (p.kind != GeluKind::kErf && p.kind != GeluKind::kTanh)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const int vec = vec_for(p.cols, p.dtype, aligned16(p.x) && aligned16(p.y) && aligned16(p.bias));
  const dim3 grid = grid_for(p.rows, p.cols, vec, false);
  switch (p.dtype) {
    case DType::kFloat32: fwd_for<float>(p, vec, grid); break;
    case DType::kFloat16: fwd_for<__half>(p, vec, grid); break;
    default: fwd_for<__nv_bfloat16>(p, vec, grid); break;
  }
  return cudaGetLastError();
}

cudaError_t bias_gelu_bwd(const BiasGeluBwdParams& p) {
  if (p.cols < 1 || (p.kind != GeluKind::kErf && p.kind != GeluKind::kTanh)) return cudaErrorInvalidValue;
  const int64_t partials = bias_gelu_bwd_num_partials(p.rows, p.cols, p.dtype);
  if (partials > 0) {
    // the workspace was sized for the vector path's split; the scalar path uses the same row split
    const int vec = vec_for(p.cols, p.dtype, aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx) && aligned16(p.bias));
    dim3 grid = grid_for(p.rows, p.cols, vec, true);
    grid.y = static_cast<unsigned>(partials);
    switch (p.dtype) {
      case DType::kFloat32: bwd_for<float>(p, vec, grid); break;
      case DType::kFloat16: bwd_for<__half>(p, vec, grid); break;
      default: bwd_for<__nv_bfloat16>(p, vec, grid); break;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  FASTBERT_LAUNCH(static_cast<unsigned>(ceil_div(p.cols, kTx)), dim3(kTx, kTy), 0, p.stream, bias_gelu_dbias_kernel)(
      p.partial, partials, p.cols, p.dbias, p.dbias_dtype);
  return cudaGetLastError();
}

}  // namespace fastbert
