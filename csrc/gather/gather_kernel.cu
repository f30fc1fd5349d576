// Row gather/scatter as vectorized byte copies: 16-byte loads and stores when the row size and
// the pointers allow it, narrower otherwise, so any hidden size and dtype works.
#include "gather/gather.h"

namespace fastbert {
namespace {

constexpr int kThreads = kGatherThreads;  // gather.h
constexpr int kRowsPerBlock = kThreads / 32;  // one warp per row

template <typename Vec>
__global__ void gather_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                   const int64_t* __restrict__ index, int64_t num_index,
                                   int64_t vecs_per_row, int64_t src_stride, int64_t dst_stride) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32; row < num_index;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const Vec* s = reinterpret_cast<const Vec*>(src + index[row] * src_stride);
    Vec* d = reinterpret_cast<Vec*>(dst + row * dst_stride);
    for (int64_t v = lane; v < vecs_per_row; v += 32) d[v] = s[v];
  }
}

__global__ void build_inverse_kernel(const int64_t* __restrict__ index, int32_t* __restrict__ inverse,
                                     int64_t num_index) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < num_index;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    inverse[index[i]] = static_cast<int32_t>(i);
}

template <typename Vec>
__global__ void scatter_rows_kernel(const char* __restrict__ src, char* __restrict__ dst,
                                    const int32_t* __restrict__ inverse, int64_t num_dst_rows,
                                    int64_t vecs_per_row, int64_t src_stride, int64_t dst_stride) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32; row < num_dst_rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int32_t from = inverse[row];
    Vec* d = reinterpret_cast<Vec*>(dst + row * dst_stride);
    if (from >= 0) {
      const Vec* s = reinterpret_cast<const Vec*>(src + static_cast<int64_t>(from) * src_stride);
      for (int64_t v = lane; v < vecs_per_row; v += 32) d[v] = s[v];
    } else {
      const Vec zero{};
      for (int64_t v = lane; v < vecs_per_row; v += 32) d[v] = zero;
    }
  }
}

// The widest access (16, 8, 4, 2 or 1 bytes) that divides the row size, both strides and both
// base addresses.
int vector_bytes(const void* a, const void* b, int64_t row_bytes, int64_t sa, int64_t sb) {
  const uint64_t bits = reinterpret_cast<uint64_t>(a) | reinterpret_cast<uint64_t>(b) |
                        static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(sa) |
                        static_cast<uint64_t>(sb);
  for (int w = 16; w > 1; w /= 2)
    if (bits % w == 0) return w;
  return 1;
}

template <template <typename> class Launch, typename... Args>
cudaError_t dispatch_vector(int width, Args... args) {
  switch (width) {
    case 16: Launch<uint4>::run(args...); break;
    case 8: Launch<uint2>::run(args...); break;
    case 4: Launch<uint32_t>::run(args...); break;
    case 2: Launch<uint16_t>::run(args...); break;
    default: Launch<uint8_t>::run(args...); break;
  }
  return cudaGetLastError();
}

template <typename Vec>
struct LaunchGather {
  static void run(const GatherRowsParams& p) {
    const int64_t vecs = p.row_bytes / sizeof(Vec);
    FASTBERT_LAUNCH(grid_size(p.num_index, kRowsPerBlock), kThreads, 0, p.stream, gather_rows_kernel<Vec>)(
        static_cast<const char*>(p.src), static_cast<char*>(p.dst), p.index, p.num_index, vecs,
        p.src_row_stride, p.dst_row_stride);
  }
};

template <typename Vec>
struct LaunchScatter {
  static void run(const ScatterRowsParams& p) {
    const int64_t vecs = p.row_bytes / sizeof(Vec);
    FASTBERT_LAUNCH(grid_size(p.num_dst_rows, kRowsPerBlock), kThreads, 0, p.stream, scatter_rows_kernel<Vec>)(
        static_cast<const char*>(p.src), static_cast<char*>(p.dst), p.inverse, p.num_dst_rows, vecs,
        p.src_row_stride, p.dst_row_stride);
  }
};

}  // namespace

cudaError_t gather_rows(const GatherRowsParams& p) {
  if (p.num_index == 0 || p.row_bytes == 0) return cudaSuccess;
  const int w = vector_bytes(p.src, p.dst, p.row_bytes, p.src_row_stride, p.dst_row_stride);
  return dispatch_vector<LaunchGather>(w, p);
}

cudaError_t scatter_rows(const ScatterRowsParams& p) {
  if (p.num_dst_rows == 0 || p.row_bytes == 0) return cudaSuccess;
  cudaError_t err = cudaMemsetAsync(p.inverse, 0xff, p.num_dst_rows * sizeof(int32_t), p.stream);
  if (err != cudaSuccess) return err;
  if (p.num_index > 0) {
    FASTBERT_LAUNCH(grid_size(p.num_index, kThreads), kThreads, 0, p.stream, build_inverse_kernel)(
        p.index, p.inverse, p.num_index);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int w = vector_bytes(p.src, p.dst, p.row_bytes, p.src_row_stride, p.dst_row_stride);
  return dispatch_vector<LaunchScatter>(w, p);
}

}  // namespace fastbert
