// Residual + LayerNorm, forward and backward. One thread block per row (grid-stride over rows);
// each thread keeps its NV packs of VEC elements of the row in registers, so the row is read
// from memory once. VEC elements make a 16-, 8- or 4-byte access, the widest the hidden size and
// the pointers allow, else 1 (the scalar fallback); the fp32 weight and bias are read VEC floats
// at a time (16-byte loads where VEC >= 4). Statistics and accumulation are fp32; the mean and
// variance are two-pass over the registers (no E[x^2] - E[x]^2 cancellation).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <initializer_list>
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

// VEC consecutive fp32 parameters from p[col], col a multiple of VEC: 16-byte loads (8-byte for
// VEC 2); the launcher checked the pointer's alignment. nullptr reads as `fill`.
template <int VEC>
__device__ __forceinline__ void load_params(const float* p, int col, float fill, float (&out)[VEC]) {
  if (p == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  } else if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const float4 v = reinterpret_cast<const float4*>(p + col)[q];
      out[4 * q] = v.x;
      out[4 * q + 1] = v.y;
      out[4 * q + 2] = v.z;
      out[4 * q + 3] = v.w;
    }
  } else if constexpr (VEC == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p + col);
    out[0] = v.x;
    out[1] = v.y;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = p[col + j];
  }
}

// VEC fp32 values to p[col] (col a multiple of VEC; p 16-byte aligned): 16-byte stores where VEC >= 4.
template <int VEC>
__device__ __forceinline__ void store_floats(float* p, int col, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q)
      reinterpret_cast<float4*>(p + col)[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) p[col + j] = v[j];
  }
}

// Block sizes: layernorm_config gives more than 512 threads only to the scalar NV = 8 kernels
// (hidden > 4096 without a vector width), up to 1024; every other kernel gets at most 512.
#define LAYERNORM_BOUNDS(VEC, NV) __launch_bounds__((VEC) == 1 && (NV) == 8 ? 1024 : 512)
// The backward's registers (__maxnreg__, which cannot be combined with __launch_bounds__): one pack
// per thread (every hidden size up to 4096 with 16-byte packs) at most 56: 12 three-warp blocks
// per SM (56% occupancy at hidden 768) where 57-64 allow 10 (47%). The scalar NV = 8 kernels 64
// (1024 threads fill the register file); the others 128, as __launch_bounds__(512) would give.
// Every NV = 8 kernel re-reads the row for dx instead of keeping xhat and w*dy (the scalar ones
// spilled at 64 keeping them).
#define LAYERNORM_BWD_REGS(VEC, NV) __maxnreg__((VEC) == 1 && (NV) == 8 ? 64 : (NV) == 1 ? 56 : 128)

template <typename T, int VEC, int NV>
__global__ void LAYERNORM_BOUNDS(VEC, NV) layernorm_fwd_kernel(LayerNormFwdParams p) {
  using P = Pack<T, VEC>;
  __shared__ float2 smem[32];
  const int num_packs = static_cast<int>(p.hidden / VEC);  // <= kLayerNormMaxHidden: 32-bit indices
  const float inv_hidden = 1.f / static_cast<float>(p.hidden);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const P* x = reinterpret_cast<const P*>(p.x) + row * num_packs;
    const P* r = p.residual ? reinterpret_cast<const P*>(p.residual) + row * num_packs : nullptr;
    P* s = p.sum ? reinterpret_cast<P*>(p.sum) + row * num_packs : nullptr;
    float h[NV][VEC];
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
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
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
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
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
      if (i < num_packs) {
        P out;
        float w[VEC], b[VEC];
        load_params<VEC>(p.weight, i * VEC, 1.f, w);
        load_params<VEC>(p.bias, i * VEC, 0.f, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>((h[k][j] - mean) * rstd * w[j] + b[j]);
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
__device__ __forceinline__ void layernorm_bwd_body(const LayerNormBwdParams& p) {
  using P = Pack<T, VEC>;
  __shared__ float2 smem[32];
  const int num_packs = static_cast<int>(p.hidden / VEC);  // <= kLayerNormMaxHidden: 32-bit indices
  const float inv_hidden = 1.f / static_cast<float>(p.hidden);
  float dw[NV][VEC], db[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dw[k][j] = db[k][j] = 0.f;

  constexpr bool kKeep = NV < 8;  // keep xhat and w*dy for dx in registers (else re-read the row)
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const P* h = reinterpret_cast<const P*>(p.h) + row * num_packs;
    const P* dy = reinterpret_cast<const P*>(p.dy) + row * num_packs;
    const float mean = p.mean[row], rstd = p.rstd[row];
    float xhat[kKeep ? NV : 1][VEC], wdy[kKeep ? NV : 1][VEC];
    float2 acc = make_float2(0.f, 0.f);  // sum(w*dy), sum(w*dy*xhat)
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
      if (i < num_packs) {
        const P a = h[i], g = dy[i];
        float w[VEC];
        load_params<VEC>(p.weight, i * VEC, 1.f, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = to_float(g.v[j]);
          const float xh = (to_float(a.v[j]) - mean) * rstd, wd = w[j] * d;
          if constexpr (kKeep) {
            xhat[k][j] = xh;
            wdy[k][j] = wd;
          }
          dw[k][j] += d * xh;
          db[k][j] += d;
          acc.x += wd;
          acc.y += wd * xh;
        }
      }
    }
    acc = block_sum(acc, smem);
    const float c1 = acc.x * inv_hidden, c2 = acc.y * inv_hidden;
    P* dx = reinterpret_cast<P*>(p.dx) + row * num_packs;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
      if (i < num_packs) {
        P out;
        if constexpr (kKeep) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>((wdy[k][j] - c1 - xhat[k][j] * c2) * rstd);
        } else {  // the same values, recomputed from the row (in L1/L2: this block just read it)
          const P a = h[i], g = dy[i];
          float w[VEC];
          load_params<VEC>(p.weight, i * VEC, 1.f, w);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float xh = (to_float(a.v[j]) - mean) * rstd, wd = w[j] * to_float(g.v[j]);
            out.v[j] = from_float<T>((wd - c1 - xh * c2) * rstd);
          }
        }
        dx[i] = out;
      }
    }
  }
  float* pw = p.partial + blockIdx.x * p.hidden;
  float* pb = p.partial + (gridDim.x + blockIdx.x) * p.hidden;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
    if (i < num_packs) {
      store_floats<VEC>(pw, i * VEC, dw[k]);
      store_floats<VEC>(pb, i * VEC, db[k]);
    }
  }
}

template <typename T, int VEC, int NV>
__global__ void LAYERNORM_BWD_REGS(VEC, NV) layernorm_bwd_kernel(LayerNormBwdParams p) {
  layernorm_bwd_body<T, VEC, NV>(p);
}

// Second stage: dweight[c] = sum over the partial rows (blockIdx.y 0), dbias likewise (1). A block
// of 8 x 32 threads owns 8 columns (each warp reads 4 rows of 32 bytes: whole sectors) and splits
// the partial rows 32 ways; the 32 sums are added in a fixed order (deterministic, no atomics).
constexpr int kReduceCols = kLayerNormReduceCols, kReduceRows = kLayerNormReduceRows;  // layernorm.h

__global__ void layernorm_reduce_kernel(const float* __restrict__ partial, int64_t num_partials, int64_t hidden,
                                        float* __restrict__ dweight, float* __restrict__ dbias) {
  __shared__ float sums[kReduceRows][kReduceCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  const float* src = partial + static_cast<int64_t>(blockIdx.y) * num_partials * hidden;
  float acc = 0.f;
  if (col < hidden)
    for (int64_t r = threadIdx.y; r < num_partials; r += kReduceRows) acc += src[r * hidden + col];
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    for (int r = 1; r < kReduceRows; ++r) acc += sums[r][threadIdx.x];
    (blockIdx.y == 0 ? dweight : dbias)[col] = acc;
  }
}

// ----------------------------------------------------------------------------- launch config

using Config = LayerNormConfig;  // layernorm.h

// The widest access (16, 8, 4, 2 or 1 bytes) every pointer's alignment allows; nullptr allows any.
int alignment(std::initializer_list<const void*> ptrs) {
  int bytes = 16;
  for (const void* p : ptrs)
    while (p != nullptr && bytes > 1 && reinterpret_cast<uintptr_t>(p) % bytes != 0) bytes /= 2;
  return bytes;
}

// data: the rows' pointers; params: the fp32 weight/bias, read vec floats at a time (min(16, 4 * vec)
// bytes): the widest vec both allow.
Config pick_config(int64_t hidden, DType dtype, std::initializer_list<const void*> data,
                   std::initializer_list<const void*> params) {
  const int data_bytes = alignment(data), param_bytes = alignment(params);
  for (int bytes : kLayerNormAccessBytes) {
    const int vec = bytes / dtype_size(dtype);
    const int param_need = 4 * vec < 16 ? 4 * vec : 16;
    if (bytes <= data_bytes && param_need <= param_bytes) return layernorm_config(hidden, dtype, bytes);
  }
  return layernorm_config(hidden, dtype, 1);
}

int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    return 132;
  return sms;
}

// Calls launch(std::integral_constant<int, NV>{}) for the packs per thread the config chose;
// false if none. Only NV <= layernorm_max_packs_per_thread(VEC) is instantiated: no hidden size
// reaches more (16-bit types with 16-byte packs stop at 2, fp32 at 4, the scalar path at 8).
template <int VEC, typename Launch>
bool dispatch_packs_per_thread(int nv, Launch&& launch) {
  constexpr int kMaxNV = layernorm_max_packs_per_thread(VEC);
  if (nv > kMaxNV) return false;
  switch (nv) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr (kMaxNV >= 2) launch(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr (kMaxNV >= 4) launch(std::integral_constant<int, 4>{}); break;
    default: if constexpr (kMaxNV >= 8) launch(std::integral_constant<int, 8>{}); break;
  }
  return true;
}

template <int VEC, typename Launch>
cudaError_t with_packs_per_thread(int nv, Launch&& launch) {
  if (!dispatch_packs_per_thread<VEC>(nv, launch)) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

// Calls f(std::integral_constant<int, VEC>{}) for the config's vec: 16-, 8- and (16-bit types) 4-byte
// packs, or 1; false for any other.
template <typename T, typename F>
bool dispatch_vec(int vec, F&& f) {
  constexpr int kWide = 16 / sizeof(T), kHalf = kWide / 2, kQuarter = kWide / 4 >= 2 ? kWide / 4 : 1;
  if (vec == kWide) f(std::integral_constant<int, kWide>{});
  else if (vec == kHalf) f(std::integral_constant<int, kHalf>{});
  else if (vec == kQuarter) f(std::integral_constant<int, kQuarter>{});
  else if (vec == 1) f(std::integral_constant<int, 1>{});
  else return false;
  return true;
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
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_vec<T>(c.vec, [&](auto vec) { err = launch_fwd<T, decltype(vec)::value>(p, c, grid); });
  return err;
}

template <typename T>
cudaError_t bwd_for(const LayerNormBwdParams& p, const Config& c, int grid) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_vec<T>(c.vec, [&](auto vec) { err = launch_bwd<T, decltype(vec)::value>(p, c, grid); });
  return err;
}

// Blocks of the backward kernel for config c resident per SM (registers, threads, shared memory).
template <typename T>
int bwd_blocks_per_sm(const Config& c) {
  int blocks = 0;
  dispatch_vec<T>(c.vec, [&](auto vec) {
    dispatch_packs_per_thread<decltype(vec)::value>(c.nv, [&](auto nv) {
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              &blocks, layernorm_bwd_kernel<T, decltype(vec)::value, decltype(nv)::value>, c.threads, 0) != cudaSuccess)
        blocks = 0;
    });
  });
  return blocks;
}

}  // namespace

int64_t layernorm_bwd_num_partials(int64_t rows, int64_t hidden, DType dtype) {
  if (rows <= 0 || hidden < 1 || hidden > kLayerNormMaxHidden) return 0;
  const Config c = layernorm_config(hidden, dtype, 16);
  const int per_sm = dtype == DType::kFloat32   ? bwd_blocks_per_sm<float>(c)
                     : dtype == DType::kFloat16 ? bwd_blocks_per_sm<__half>(c)
                                                : bwd_blocks_per_sm<__nv_bfloat16>(c);
  const int64_t blocks = static_cast<int64_t>(num_sms()) * (per_sm > 0 ? per_sm : 1);
  return rows < blocks ? rows : blocks;
}

cudaError_t layernorm_fwd(const LayerNormFwdParams& p) {
  if (p.hidden < 1 || p.hidden > kLayerNormMaxHidden) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const Config c = pick_config(p.hidden, p.dtype, {p.x, p.y, p.residual, p.sum}, {p.weight, p.bias});
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
    const Config c = pick_config(p.hidden, p.dtype, {p.dy, p.h, p.dx}, {p.weight});
    const int grid = static_cast<int>(partials);
    cudaError_t err = p.dtype == DType::kFloat32   ? bwd_for<float>(p, c, grid)
                      : p.dtype == DType::kFloat16 ? bwd_for<__half>(p, c, grid)
                                                   : bwd_for<__nv_bfloat16>(p, c, grid);
    if (err != cudaSuccess) return err;
  }
  const dim3 block(kReduceCols, kReduceRows), grid(static_cast<unsigned>(ceil_div(p.hidden, kReduceCols)), 2);
  FASTBERT_LAUNCH(grid, block, 0, p.stream, layernorm_reduce_kernel)(
      p.partial, partials, p.hidden, p.dweight, p.dbias);
  return cudaGetLastError();
}

}  // namespace fastbert
