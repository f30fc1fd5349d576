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
#include "block_reduce.cuh"
#include "device_utils.cuh"

namespace fastbert {
namespace {

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

// Registers and block sizes: the budgets layernorm.h sizes the blocks with (common.h row_budget).
#define LAYERNORM_FWD_BOUNDS(VEC, NV) FASTBERT_ROW_BOUNDS(layernorm_fwd_budget(VEC, NV))
#define LAYERNORM_BWD_BOUNDS(VEC, NV) FASTBERT_ROW_BOUNDS(layernorm_bwd_budget(VEC, NV))

template <typename T, int VEC, int NV>
__global__ void LAYERNORM_FWD_BOUNDS(VEC, NV) layernorm_fwd_kernel(LayerNormFwdParams p) {
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
// it handled) kept in shared memory (layernorm_bwd_smem_bytes: [2][VEC][num_packs] fp32, element j
// of pack i at j * num_packs + i, so a warp's accesses hit 32 banks; each slot is touched by its
// one thread only, no barrier), then written to its own workspace row.
template <typename T, int VEC, int NV>
__device__ __forceinline__ void layernorm_bwd_body(const LayerNormBwdParams& p) {
  using P = Pack<T, VEC>;
  __shared__ float2 smem[32];
  FASTBERT_DYNAMIC_SHARED(float, sums);  // [dweight, dbias][hidden]
  const int num_packs = static_cast<int>(p.hidden / VEC);  // <= kLayerNormMaxHidden: 32-bit indices
  const float inv_hidden = 1.f / static_cast<float>(p.hidden);
  float* sum_w = sums;
  float* sum_b = sums + p.hidden;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
    if (i < num_packs) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum_w[j * num_packs + i] = sum_b[j * num_packs + i] = 0.f;
    }
  }

  // Up to 4 elements a thread keep xhat and w*dy for dx in registers; more re-read the row (from
  // L1/L2: this block just read it) within the register budget.
  constexpr bool kKeep = NV * VEC <= 4;
  // Without kept values nothing in the row loops is indexed by pack: the scalar 8-pack kernel
  // unrolls them by 2 only (fully unrolled it spilled 8 B on sm_90 at 64 registers).
  constexpr int kRowUnroll = kKeep || NV < 8 ? NV : 2;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const P* h = reinterpret_cast<const P*>(p.h) + row * num_packs;
    const P* dy = reinterpret_cast<const P*>(p.dy) + row * num_packs;
    const float mean = p.mean[row], rstd = p.rstd[row];
    float xhat[kKeep ? NV : 1][VEC], wdy[kKeep ? NV : 1][VEC];
    float2 acc = make_float2(0.f, 0.f);  // sum(w*dy), sum(w*dy*xhat)
#pragma unroll kRowUnroll
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
          sum_w[j * num_packs + i] += d * xh;
          sum_b[j * num_packs + i] += d;
          acc.x += wd;
          acc.y += wd * xh;
        }
      }
    }
    acc = block_sum(acc, smem);
    const float c1 = acc.x * inv_hidden, c2 = acc.y * inv_hidden;
    P* dx = reinterpret_cast<P*>(p.dx) + row * num_packs;
#pragma unroll kRowUnroll
    for (int k = 0; k < NV; ++k) {
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
      if (i < num_packs) {
        P out;
        if constexpr (kKeep) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>((wdy[k][j] - c1 - xhat[k][j] * c2) * rstd);
        } else {  // the same values, recomputed from the row
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
      float vw[VEC], vb[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        vw[j] = sum_w[j * num_packs + i];
        vb[j] = sum_b[j * num_packs + i];
      }
      store_floats<VEC>(pw, i * VEC, vw);
      store_floats<VEC>(pb, i * VEC, vb);
    }
  }
}

template <typename T, int VEC, int NV>
__global__ void LAYERNORM_BWD_BOUNDS(VEC, NV) layernorm_bwd_kernel(LayerNormBwdParams p) {
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
                   std::initializer_list<const void*> params, bool backward) {
  const int data_bytes = alignment(data), param_bytes = alignment(params);
  for (int bytes : kLayerNormAccessBytes) {
    const int vec = bytes / dtype_size(dtype);
    const int param_need = 4 * vec < 16 ? 4 * vec : 16;
    if (bytes <= data_bytes && param_need <= param_bytes) return layernorm_config(hidden, dtype, bytes, backward);
  }
  return layernorm_config(hidden, dtype, 1, backward);
}

int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    return 132;
  return sms;
}

// Calls launch(std::integral_constant<int, NV>{}) for the packs per thread the config chose;
// false if none. Only the NV layernorm_nv_mask(VEC, kBackward) names are instantiated: the ones
// some hidden size <= kLayerNormMaxHidden reaches.
template <int VEC, bool kBackward, typename Launch>
bool dispatch_packs_per_thread(int nv, Launch&& launch) {
  constexpr unsigned kMask = layernorm_nv_mask(VEC, kBackward);
  if (nv < 1 || nv > 8 || !(kMask & (1u << nv))) return false;
  switch (nv) {
    case 1: if constexpr ((kMask >> 1) & 1u) launch(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr ((kMask >> 2) & 1u) launch(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr ((kMask >> 4) & 1u) launch(std::integral_constant<int, 4>{}); break;
    case 8: if constexpr ((kMask >> 8) & 1u) launch(std::integral_constant<int, 8>{}); break;
    default: return false;
  }
  return true;
}

template <int VEC, bool kBackward, typename Launch>
cudaError_t with_packs_per_thread(int nv, Launch&& launch) {
  if (!dispatch_packs_per_thread<VEC, kBackward>(nv, launch)) return cudaErrorInvalidValue;
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
  return with_packs_per_thread<VEC, false>(c.nv, [&](auto nv) {
    FASTBERT_LAUNCH(grid, c.threads, 0, p.stream, layernorm_fwd_kernel<T, VEC, decltype(nv)::value>)(p);
  });
}

// The backward kernel's dynamic shared memory for `hidden`, allowed above the default 48 KiB per
// block (hidden > 6112) with the opt-in attribute: before its launch and before an occupancy query
// (which counts 0 blocks for more shared memory than the kernel is allowed).
template <typename Kernel>
cudaError_t allow_bwd_smem(Kernel* kernel, int64_t hidden) {
  const size_t smem = layernorm_bwd_smem_bytes(hidden);
  if (smem + 32 * sizeof(float2) <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

template <typename T, int VEC>
cudaError_t launch_bwd(const LayerNormBwdParams& p, const Config& c, int grid) {
  cudaError_t err = cudaSuccess;
  const cudaError_t launched = with_packs_per_thread<VEC, true>(c.nv, [&](auto nv) {
    const size_t smem = layernorm_bwd_smem_bytes(p.hidden);
    err = allow_bwd_smem(layernorm_bwd_kernel<T, VEC, decltype(nv)::value>, p.hidden);
    if (err == cudaSuccess)
      FASTBERT_LAUNCH(grid, c.threads, smem, p.stream, layernorm_bwd_kernel<T, VEC, decltype(nv)::value>)(p);
  });
  return err != cudaSuccess ? err : launched;
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
int bwd_blocks_per_sm(const Config& c, int64_t hidden) {
  int blocks = 0;
  dispatch_vec<T>(c.vec, [&](auto vec) {
    dispatch_packs_per_thread<decltype(vec)::value, true>(c.nv, [&](auto nv) {
      auto* kernel = layernorm_bwd_kernel<T, decltype(vec)::value, decltype(nv)::value>;
      if (allow_bwd_smem(kernel, hidden) != cudaSuccess ||
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, c.threads, layernorm_bwd_smem_bytes(hidden)) !=
              cudaSuccess)
        blocks = 0;
    });
  });
  return blocks;
}

}  // namespace

int64_t layernorm_bwd_num_partials(int64_t rows, int64_t hidden, DType dtype) {
  if (rows <= 0 || hidden < 1 || hidden > kLayerNormMaxHidden) return 0;
  const Config c = layernorm_config(hidden, dtype, 16, true);
  const int per_sm = dtype == DType::kFloat32   ? bwd_blocks_per_sm<float>(c, hidden)
                     : dtype == DType::kFloat16 ? bwd_blocks_per_sm<__half>(c, hidden)
                                                : bwd_blocks_per_sm<__nv_bfloat16>(c, hidden);
  const int64_t blocks = static_cast<int64_t>(num_sms()) * (per_sm > 0 ? per_sm : 1);
  return rows < blocks ? rows : blocks;
}

cudaError_t layernorm_fwd(const LayerNormFwdParams& p) {
  if (p.hidden < 1 || p.hidden > kLayerNormMaxHidden) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const Config c = pick_config(p.hidden, p.dtype, {p.x, p.y, p.residual, p.sum}, {p.weight, p.bias}, false);
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
    const Config c = pick_config(p.hidden, p.dtype, {p.dy, p.h, p.dx}, {p.weight}, true);
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
