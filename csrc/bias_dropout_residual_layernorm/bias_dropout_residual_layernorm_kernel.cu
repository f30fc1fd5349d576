// Bias + dropout + residual + LayerNorm, forward and backward (see bias_dropout_residual_layernorm.h).
// One thread block per row (grid-stride over rows); each thread keeps its NV packs of VEC
// elements of the row in registers, so every tensor is read once and written once (the backward
// reads h and dy a second time for dx when a thread holds more than 4 elements, from L1/L2: its
// block has just read them). Block sizes and register budgets: bdrln_config (the header). VEC = 16
// bytes / element size when the hidden size and the pointers allow 16-byte accesses (the fp32
// per-feature parameters then load as float4), else 1 (the scalar fallback). Statistics and sums
// are fp32; mean and variance are two-pass over the registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "bias_dropout_residual_layernorm/bias_dropout_residual_layernorm.h"
#include "block_reduce.cuh"
#include "device_utils.cuh"

namespace fastbert {
namespace {

// VEC fp32 per-feature values from col0 (float4 loads when VEC % 4 == 0), or `fill` for nullptr.
template <int VEC>
__device__ __forceinline__ void load_param(const float* param, int64_t col0, float fill, float (&out)[VEC]) {
  if (param == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = fill;
  } else if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const Pack<float, 4> v = reinterpret_cast<const Pack<float, 4>*>(param + col0)[q];
#pragma unroll
      for (int j = 0; j < 4; ++j) out[4 * q + j] = v.v[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = param[col0 + j];
  }
}

template <typename T, int VEC, int NV>
__global__ void FASTBERT_ROW_BOUNDS(bdrln_fwd_budget(VEC, NV)) bdrln_fwd_kernel(BdrlnFwdParams p) {
  using P = Pack<T, VEC>;
  __shared__ float2 smem[32];
  const int num_packs = static_cast<int>(p.hidden / VEC);  // <= kBdrlnMaxHidden: 32-bit indices
  const float inv_hidden = 1.f / static_cast<float>(p.hidden);
  const bool drop_input = p.dropout.enabled && !p.dropout_after_norm;
  const bool drop_output = p.dropout.enabled && p.dropout_after_norm;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const P* x = reinterpret_cast<const P*>(p.x) + row * num_packs;
    const P* r = reinterpret_cast<const P*>(p.residual) + row * num_packs;
    const P* r2 = p.residual2 ? reinterpret_cast<const P*>(p.residual2) + row * num_packs : nullptr;
    P* hout = reinterpret_cast<P*>(p.h) + row * num_packs;
    float h[NV][VEC];
    uint32_t keep[NV];
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
      if (i < num_packs) {
        const P a = x[i], res = r[i];
        P res2;
        if (r2) res2 = r2[i];
        float b[VEC];
        load_param<VEC>(p.bias, static_cast<int64_t>(i) * VEC, 0.f, b);
        keep[k] = row_dropout_keep_bits<VEC>(p.dropout, row, static_cast<int64_t>(i) * VEC);
        P s;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float v = to_float(a.v[j]) + b[j];
          if (drop_input) v = (keep[k] >> j) & 1u ? v * p.dropout.keep_scale : 0.f;
          v += to_float(res.v[j]);
          if (r2) v += to_float(res2.v[j]);
          s.v[j] = from_float<T>(v);  // rounded as `dropout(x + b) + residual` is
          h[k][j] = to_float(s.v[j]);  // and normalized as such
          total += h[k][j];
        }
        hout[i] = s;
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
    const float rstd = rsqrtf(block_sum(make_float2(sq, 0.f), smem).x * inv_hidden + p.eps);
    P* y = reinterpret_cast<P*>(p.y) + row * num_packs;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
      if (i < num_packs) {
        float w[VEC], be[VEC];
        load_param<VEC>(p.weight, static_cast<int64_t>(i) * VEC, 1.f, w);
        load_param<VEC>(p.beta, static_cast<int64_t>(i) * VEC, 0.f, be);
        P out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float v = (h[k][j] - mean) * rstd * w[j] + be[j];
          if (drop_output) v = (keep[k] >> j) & 1u ? v * p.dropout.keep_scale : 0.f;
          out.v[j] = from_float<T>(v);
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

// First stage of the backward: dresidual and dx per row, and this block's partial column sums
// (over the rows it handled), kept in shared memory (bdrln_bwd_smem_bytes: [3][VEC][num_packs]
// fp32, element j of pack i at j * num_packs + i, so a warp's accesses hit 32 banks; each slot is
// touched by its one thread only, no barrier), then written to its own workspace rows.
template <typename T, int VEC, int NV>
__global__ void FASTBERT_ROW_BOUNDS(bdrln_bwd_budget(VEC, NV)) bdrln_bwd_kernel(BdrlnBwdParams p) {
  using P = Pack<T, VEC>;
  __shared__ float2 smem[32];
  FASTBERT_DYNAMIC_SHARED(float, sums);  // [dweight, dbeta, dbias][hidden]
  const int num_packs = static_cast<int>(p.hidden / VEC);  // <= kBdrlnMaxHidden: 32-bit indices
  const int hidden = static_cast<int>(p.hidden);
  const float inv_hidden = 1.f / static_cast<float>(p.hidden);
  float* sum_w = sums;
  float* sum_beta = sums + hidden;
  float* sum_bias = sums + 2 * hidden;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
    if (i < num_packs) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum_w[j * num_packs + i] = sum_beta[j * num_packs + i] = sum_bias[j * num_packs + i] = 0.f;
    }
  }

  constexpr bool kKeep = NV * VEC <= 4;  // keep xhat and w*dy for dx in registers, else re-read the row
  const bool drop_input = p.dropout.enabled && !p.dropout_after_norm;
  const bool drop_output = p.dropout.enabled && p.dropout_after_norm;
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
        load_param<VEC>(p.weight, static_cast<int64_t>(i) * VEC, 1.f, w);
        const uint32_t keep = drop_output ? row_dropout_keep_bits<VEC>(p.dropout, row, static_cast<int64_t>(i) * VEC) : 0u;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float d = to_float(g.v[j]);
          if (drop_output) d = (keep >> j) & 1u ? d * p.dropout.keep_scale : 0.f;  // through the output's dropout
          const float xh = (to_float(a.v[j]) - mean) * rstd, wd = w[j] * d;
          if constexpr (kKeep) {
            xhat[k][j] = xh;
            wdy[k][j] = wd;
          }
          sum_w[j * num_packs + i] += d * xh;
          sum_beta[j * num_packs + i] += d;
          acc.x += wd;
          acc.y += wd * xh;
        }
      }
    }
    acc = block_sum(acc, smem);
    const float c1 = acc.x * inv_hidden, c2 = acc.y * inv_hidden;
    P* dres = reinterpret_cast<P*>(p.dresidual) + row * num_packs;
    P* dx = p.dx ? reinterpret_cast<P*>(p.dx) + row * num_packs : nullptr;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
      if (i < num_packs) {
        // one draw serves either mode (drop_input and drop_output exclude each other)
        const uint32_t keep = drop_input || (!kKeep && drop_output)
                                  ? row_dropout_keep_bits<VEC>(p.dropout, row, static_cast<int64_t>(i) * VEC)
                                  : 0u;
        P a, g;
        float w[VEC];
        if constexpr (!kKeep) {  // xhat and w*dy recomputed from the row
          a = h[i];
          g = dy[i];
          load_param<VEC>(p.weight, static_cast<int64_t>(i) * VEC, 1.f, w);
        }
        P o_res, o_x;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float xh, wd;
          if constexpr (kKeep) {
            xh = xhat[k][j];
            wd = wdy[k][j];
          } else {
            float d = to_float(g.v[j]);
            if (drop_output) d = (keep >> j) & 1u ? d * p.dropout.keep_scale : 0.f;
            xh = (to_float(a.v[j]) - mean) * rstd;
            wd = w[j] * d;
          }
          const float dh = (wd - c1 - xh * c2) * rstd;
          const float d = drop_input ? ((keep >> j) & 1u ? dh * p.dropout.keep_scale : 0.f) : dh;
          sum_bias[j * num_packs + i] += d;
          o_res.v[j] = from_float<T>(dh);
          o_x.v[j] = from_float<T>(d);
        }
        dres[i] = o_res;
        if (p.dx) dx[i] = o_x;
      }
    }
  }
  // workspace rows: [0, G) dweight, [G, 2G) dbeta, [2G, 3G) dbias, G = gridDim.x
  float* pw = p.partial + static_cast<int64_t>(blockIdx.x) * p.hidden;
  float* pb = p.partial + static_cast<int64_t>(gridDim.x + blockIdx.x) * p.hidden;
  float* pd = p.partial + static_cast<int64_t>(2 * gridDim.x + blockIdx.x) * p.hidden;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = static_cast<int>(threadIdx.x + k * blockDim.x);
    if (i < num_packs) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        pw[i * VEC + j] = sum_w[j * num_packs + i];
        pb[i * VEC + j] = sum_beta[j * num_packs + i];
        pd[i * VEC + j] = sum_bias[j * num_packs + i];
      }
    }
  }
}

// Second stage: out_s[c] = sum over the workspace rows of sum s (blockIdx.y: 0 dweight, 1 dbeta,
// 2 dbias). A block of 32 x 8 threads owns 32 columns (coalesced reads) and splits the rows 8 ways.
constexpr int kReduceCols = kBdrlnReduceCols, kReduceRows = kBdrlnReduceRows;

__global__ void __launch_bounds__(kReduceCols * kReduceRows) bdrln_reduce_kernel(
    const float* __restrict__ partial, int64_t num_partials, int64_t hidden, void* __restrict__ dweight,
    void* __restrict__ dbeta, void* __restrict__ dbias, DType grad_dtype) {
  __shared__ float s[kReduceRows][kReduceCols + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceCols + threadIdx.x;
  const float* base = partial + static_cast<int64_t>(blockIdx.y) * num_partials * hidden;
  float v = 0.f;
  if (col < hidden)
    for (int64_t r = threadIdx.y; r < num_partials; r += kReduceRows) v += base[r * hidden + col];
  s[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    for (int r = 1; r < kReduceRows; ++r) v += s[r][threadIdx.x];
    void* out = blockIdx.y == 0 ? dweight : blockIdx.y == 1 ? dbeta : dbias;
    store_as(out, grad_dtype, col, v);
  }
}

// ----------------------------------------------------------------------------- launch config

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }  // nullptr: true

int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    return 132;
  return sms;
}

// Calls launch(std::integral_constant<int, NV>{}) for the packs per thread of the config. Only the
// NV bdrln_nv_mask(VEC, kBackward) names are instantiated: the ones some hidden size reaches.
template <int VEC, bool kBackward, typename Launch>
cudaError_t with_packs_per_thread(int nv, Launch&& launch) {
  constexpr unsigned kMask = bdrln_nv_mask(VEC, kBackward);
  if (nv < 1 || nv > 8 || !(kMask & (1u << nv))) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  switch (nv) {
    case 1: if constexpr ((kMask >> 1) & 1u) err = launch(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr ((kMask >> 2) & 1u) err = launch(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr ((kMask >> 4) & 1u) err = launch(std::integral_constant<int, 4>{}); break;
    case 8: if constexpr ((kMask >> 8) & 1u) err = launch(std::integral_constant<int, 8>{}); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_fwd(const BdrlnFwdParams& p, const BdrlnConfig& c, int grid) {
  return with_packs_per_thread<VEC, false>(c.nv, [&](auto nv) {
    FASTBERT_LAUNCH(grid, c.threads, 0, p.stream, bdrln_fwd_kernel<T, VEC, decltype(nv)::value>)(p);
    return cudaSuccess;
  });
}

template <typename T, int VEC>
cudaError_t launch_bwd(const BdrlnBwdParams& p, const BdrlnConfig& c, int grid) {
  return with_packs_per_thread<VEC, true>(c.nv, [&](auto nv) {
    auto* kernel = bdrln_bwd_kernel<T, VEC, decltype(nv)::value>;
    const size_t smem = bdrln_bwd_smem_bytes(p.hidden);
    if (smem + 32 * sizeof(float2) > 48 * 1024) {  // over the default limit per block (hidden > 4074)
      const cudaError_t err =
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    FASTBERT_LAUNCH(grid, c.threads, smem, p.stream, bdrln_bwd_kernel<T, VEC, decltype(nv)::value>)(p);
    return cudaSuccess;
  });
}

template <typename T>
cudaError_t fwd_for(const BdrlnFwdParams& p, const BdrlnConfig& c, int grid) {
  return c.vec == 1 ? launch_fwd<T, 1>(p, c, grid) : launch_fwd<T, 16 / sizeof(T)>(p, c, grid);
}

template <typename T>
cudaError_t bwd_for(const BdrlnBwdParams& p, const BdrlnConfig& c, int grid) {
  return c.vec == 1 ? launch_bwd<T, 1>(p, c, grid) : launch_bwd<T, 16 / sizeof(T)>(p, c, grid);
}

}  // namespace

int64_t bdrln_bwd_num_partials(int64_t rows, int64_t hidden, DType dtype) {
  if (rows <= 0) return 0;
  const BdrlnConfig c = bdrln_config(hidden, dtype, true, true);
  int64_t per_sm = 2048 / (c.threads > 0 ? c.threads : 32);
  if (per_sm > kBdrlnBwdBlocksPerSm) per_sm = kBdrlnBwdBlocksPerSm;
  if (per_sm < 1) per_sm = 1;
  const int64_t blocks = num_sms() * per_sm;
  return rows < blocks ? rows : blocks;
}

cudaError_t bdrln_fwd(const BdrlnFwdParams& p) {
  if (p.hidden < 1 || p.hidden > kBdrlnMaxHidden) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const bool aligned = aligned16(p.x) && aligned16(p.residual) && aligned16(p.residual2) && aligned16(p.y) &&
                       aligned16(p.h) && aligned16(p.bias) && aligned16(p.weight) && aligned16(p.beta);
  const BdrlnConfig c = bdrln_config(p.hidden, p.dtype, aligned, false);
  const int grid = static_cast<int>(p.rows < (1 << 20) ? p.rows : (1 << 20));
  switch (p.dtype) {
    case DType::kFloat32: return fwd_for<float>(p, c, grid);
    case DType::kFloat16: return fwd_for<__half>(p, c, grid);
    default: return fwd_for<__nv_bfloat16>(p, c, grid);
  }
}

cudaError_t bdrln_bwd(const BdrlnBwdParams& p) {
  if (p.hidden < 1 || p.hidden > kBdrlnMaxHidden) return cudaErrorInvalidValue;
  const int64_t partials = bdrln_bwd_num_partials(p.rows, p.hidden, p.dtype);
  if (partials > 0) {
    const bool aligned = aligned16(p.dy) && aligned16(p.h) && aligned16(p.dx) && aligned16(p.dresidual) &&
                         aligned16(p.weight);
    const BdrlnConfig c = bdrln_config(p.hidden, p.dtype, aligned, true);
    const int grid = static_cast<int>(partials);
    const cudaError_t err = p.dtype == DType::kFloat32   ? bwd_for<float>(p, c, grid)
                            : p.dtype == DType::kFloat16 ? bwd_for<__half>(p, c, grid)
                                                         : bwd_for<__nv_bfloat16>(p, c, grid);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.hidden, kReduceCols)), 3);
  FASTBERT_LAUNCH(grid, dim3(kReduceCols, kReduceRows), 0, p.stream, bdrln_reduce_kernel)(
      p.partial, partials, p.hidden, p.dweight, p.dbeta, p.dbias, p.grad_dtype);
  return cudaGetLastError();
}

}  // namespace fastbert
