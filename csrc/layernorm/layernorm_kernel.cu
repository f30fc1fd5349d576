// Residual + LayerNorm, forward and backward. One thread block per row (grid-stride over rows);
// each thread keeps its NV packs of VEC elements of the row in registers, so the row is read
// from memory once. VEC = 16 bytes / element size when the hidden size and the pointers allow
// 16-byte loads, else 1 (the scalar fallback). Statistics and accumulation are fp32; the mean
// and variance are two-pass over the registers (no E[x^2] - E[x]^2 cancellation).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "layernorm/layernorm.h"
#include "device_utils.cuh"

namespace fastbert {
namespace {

__device__ __forceinline__ float2 warp_sum(float2 v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
  }
  return v;
}

// Sum over the block, the same value in every thread. blockDim.x is a multiple of 32.
__device__ __forceinline__ float2 block_sum(float2 v, float2* smem) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float2 total = make_float2(0.f, 0.f);
  for (int w = 0; w < num_warps; ++w) {  // same order in every thread: deterministic
    total.x += smem[w].x;
    total.y += smem[w].y;
  }
  __syncthreads();  // smem may be written again by the next call
  return total;
}

// At most 1024 threads with few registers each, or 512 with more (see pick_config).
#define LAYERNORM_BOUNDS(VEC, NV) __launch_bounds__((VEC) * (NV) > 8 ? 512 : 1024)

template <typename T, int VEC, int NV>
__global__ void LAYERNORM_BOUNDS(VEC, NV) layernorm_fwd_kernel(LayerNormFwdParams p) {
  using P = Pack<T, VEC>;
  __shared__ float2 smem[32];
  const int64_t num_packs = p.hidden / VEC;
  const float inv_hidden = 1.f / static_cast<float>(p.hidden);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const P* x = reinterpret_cast<const P*>(p.x) + row * num_packs;
    const P* r = p.residual ? reinterpret_cast<const P*>(p.residual) + row * num_packs : nullptr;
    P* s = p.sum ? reinterpret_cast<P*>(p.sum) + row * num_packs : nullptr;
    float h[NV][VEC];
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < num_packs) {
        P a = x[i];
        if (r) {
          const P b = r[i];
#pragma unroll
          for (int j = 0; j < VEC; ++j) a.v[j] = from_float<T>(to_float(a.v[j]) + to_float(b.v[j]));
          s[i] = a;  // rounded to the input dtype, as `x + residual` would be; normalized as such
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          h[k][j] = to_float(a.v[j]);
          total += h[k][j];
        }
      }
    }
    const float mean = block_sum(make_float2(total, 0.f), smem).x * inv_hidden;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < num_packs) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) sq += (h[k][j] - mean) * (h[k][j] - mean);
      }
    }
    const float var = block_sum(make_float2(sq, 0.f), smem).x * inv_hidden;
    const float rstd = rsqrtf(var + p.eps);
    P* y = reinterpret_cast<P*>(p.y) + row * num_packs;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < num_packs) {
        P out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int64_t col = i * VEC + j;
          const float w = p.weight ? p.weight[col] : 1.f;
          const float b = p.bias ? p.bias[col] : 0.f;
          out.v[j] = from_float<T>((h[k][j] - mean) * rstd * w + b);
        }
        y[i] = out;
      }
    }
    if (threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
  }
}

// First stage of the backward: dx per row, and this block's partial dweight/dbias (over the rows
// it handled) kept in registers, then written to its own workspace row.
template <typename T, int VEC, int NV>
__global__ void LAYERNORM_BOUNDS(VEC, NV) layernorm_bwd_kernel(LayerNormBwdParams p) {
  using P = Pack<T, VEC>;
  __shared__ float2 smem[32];
  const int64_t num_packs = p.hidden / VEC;
  const float inv_hidden = 1.f / static_cast<float>(p.hidden);
  float dw[NV][VEC], db[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[k][j] = db[k][j] = 0.f;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const P* h = reinterpret_cast<const P*>(p.h) + row * num_packs;
    const P* dy = reinterpret_cast<const P*>(p.dy) + row * num_packs;
    const float mean = p.mean[row], rstd = p.rstd[row];
    float xhat[NV][VEC], wdy[NV][VEC];
    float2 acc = make_float2(0.f, 0.f);  // sum(w*dy), sum(w*dy*xhat)
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < num_packs) {
        const P a = h[i], g = dy[i];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float w = p.weight ? p.weight[i * VEC + j] : 1.f;
          const float d = to_float(g.v[j]);
          xhat[k][j] = (to_float(a.v[j]) - mean) * rstd;
          wdy[k][j] = w * d;
          dw[k][j] += d * xhat[k][j];
          db[k][j] += d;
          acc.x += wdy[k][j];
          acc.y += wdy[k][j] * xhat[k][j];
        }
      }
    }
    acc = block_sum(acc, smem);
    const float c1 = acc.x * inv_hidden, c2 = acc.y * inv_hidden;
    P* dx = reinterpret_cast<P*>(p.dx) + row * num_packs;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (i < num_packs) {
        P out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>((wdy[k][j] - c1 - xhat[k][j] * c2) * rstd);
        dx[i] = out;
      }
    }
  }
  float* pw = p.partial + blockIdx.x * p.hidden;
  float* pb = p.partial + (gridDim.x + blockIdx.x) * p.hidden;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (i < num_packs) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        pw[i * VEC + j] = dw[k][j];
        pb[i * VEC + j] = db[k][j];
      }
    }
  }
}

// Second stage: dweight[c] = sum over partial rows, likewise dbias. A block of 32 x 8 threads
// owns 32 columns (coalesced reads) and splits the partial rows 8 ways.
constexpr int kReduceCols = kLayerNormReduceCols, kReduceRows = kLayerNormReduceRows;  // layernorm.h

__global__ void layernorm_reduce_kernel(const float* __restrict__ partial, int64_t num_partials, int64_t hidden,
                                        float* __restrict__ dweight, float* __restrict__ dbias) {
  __shared__ float sw[kReduceRows][kReduceCols + 1], sb[kReduceRows][kReduceCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  float w = 0.f, b = 0.f;
  if (col < hidden) {
    for (int64_t r = threadIdx.y; r < num_partials; r += kReduceRows) {
      w += partial[r * hidden + col];
      b += partial[(num_partials + r) * hidden + col];
    }
  }
  sw[threadIdx.y][threadIdx.x] = w;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    for (int r = 1; r < kReduceRows; ++r) {
      w += sw[r][threadIdx.x];
      b += sb[r][threadIdx.x];
    }
    dweight[col] = w;
    dbias[col] = b;
  }
}

// ----------------------------------------------------------------------------- launch config

using Config = LayerNormConfig;  // layernorm.h

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

Config pick_config(int64_t hidden, DType dtype, bool pointers_aligned) {
  return layernorm_config(hidden, dtype, pointers_aligned);
}

int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    return 132;
  return sms;
}

// Calls launch(std::integral_constant<int, NV>{}) for the packs per thread the config chose.
// Only NV <= layernorm_max_packs_per_thread(VEC) is instantiated: no hidden size reaches more
// (16-bit types with 16-byte packs stop at 2, fp32 at 4, the scalar path at 8).
template <int VEC, typename Launch>
cudaError_t with_packs_per_thread(int nv, Launch&& launch) {
  constexpr int kMaxNV = layernorm_max_packs_per_thread(VEC);
  if (nv > kMaxNV) return cudaErrorInvalidValue;
  switch (nv) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr (kMaxNV >= 2) launch(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr (kMaxNV >= 4) launch(std::integral_constant<int, 4>{}); break;
    default: if constexpr (kMaxNV >= 8) launch(std::integral_constant<int, 8>{}); break;
  }
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_fwd(const LayerNormFwdParams& p, const Config& c, int grid) {
  return with_packs_per_thread<VEC>(c.nv, [&](auto nv) {
    FASTBERT_LAUNCH(grid, c.threads, 0, p.stream, layernorm_fwd_kernel<T, VEC, decltype(nv)::value>)(p);
  });
}

template <typename T, int VEC>
cudaError_t launch_bwd(const LayerNormBwdParams& p, const Config& c, int grid) {
  return with_packs_per_thread<VEC>(c.nv, [&](auto nv) {
    FASTBERT_LAUNCH(grid, c.threads, 0, p.stream, layernorm_bwd_kernel<T, VEC, decltype(nv)::value>)(p);
  });
}

template <typename T>
cudaError_t fwd_for(const LayerNormFwdParams& p, const Config& c, int grid) {
  return c.vec == 1 ? launch_fwd<T, 1>(p, c, grid) : launch_fwd<T, 16 / sizeof(T)>(p, c, grid);
}

template <typename T>
cudaError_t bwd_for(const LayerNormBwdParams& p, const Config& c, int grid) {
  return c.vec == 1 ? launch_bwd<T, 1>(p, c, grid) : launch_bwd<T, 16 / sizeof(T)>(p, c, grid);
}

}  // namespace

int64_t layernorm_bwd_num_partials(int64_t rows, int64_t hidden, DType dtype) {
  if (rows <= 0) return 0;
  const Config c = pick_config(hidden, dtype, true);
  const int64_t per_sm = c.threads > 0 ? (2048 / c.threads < 16 ? 2048 / c.threads : 16) : 1;
  const int64_t blocks = num_sms() * (per_sm > 0 ? per_sm : 1);
  return rows < blocks ? rows : blocks;
}

cudaError_t layernorm_fwd(const LayerNormFwdParams& p) {
  if (p.hidden < 1 || p.hidden > kLayerNormMaxHidden) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const bool aligned = aligned16(p.x) && aligned16(p.y) && (!p.residual || aligned16(p.residual)) &&
                       (!p.sum || aligned16(p.sum));
  const Config c = pick_config(p.hidden, p.dtype, aligned);
  const int grid = static_cast<int>(p.rows < (1 << 20) ? p.rows : (1 << 20));
  switch (p.dtype) {
    case DType::kFloat32: return fwd_for<float>(p, c, grid);
    case DType::kFloat16: return fwd_for<__half>(p, c, grid);
    default: return fwd_for<__nv_bfloat16>(p, c, grid);
  }
}

cudaError_t layernorm_bwd(const LayerNormBwdParams& p) {
  if (p.hidden < 1 || p.hidden > kLayerNormMaxHidden) return cudaErrorInvalidValue;
  const int64_t partials = layernorm_bwd_num_partials(p.rows, p.hidden, p.dtype);
  if (partials > 0) {
    const bool aligned = aligned16(p.dy) && aligned16(p.h) && aligned16(p.dx);
    const Config c = pick_config(p.hidden, p.dtype, aligned);
    const int grid = static_cast<int>(partials);
    cudaError_t err = p.dtype == DType::kFloat32   ? bwd_for<float>(p, c, grid)
                      : p.dtype == DType::kFloat16 ? bwd_for<__half>(p, c, grid)
                                                   : bwd_for<__nv_bfloat16>(p, c, grid);
    if (err != cudaSuccess) return err;
  }
  const dim3 block(kReduceCols, kReduceRows);
  FASTBERT_LAUNCH(static_cast<unsigned>(ceil_div(p.hidden, kReduceCols)), block, 0, p.stream, layernorm_reduce_kernel)(
      p.partial, partials, p.hidden, p.dweight, p.dbias);
  return cudaGetLastError();
}

}  // namespace fastbert
