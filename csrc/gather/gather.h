// Masked-token gather/scatter of rows: plain params structs and launchers, CUDA headers only.
#pragma once
#include "common.h"

namespace fastbert {

// Threads per block of every gather/scatter kernel (one warp per row).
constexpr int kGatherThreads = 256;

// dst[i, :] = src[index[i], :] for i in [0, num_index). Rows are moved as bytes, so any dtype works.
struct GatherRowsParams {
  const void* src;
  void* dst;
  const int64_t* index;       // [num_index], each in [0, num_src_rows)
  int64_t num_index;
  int64_t row_bytes;          // hidden * element size
  int64_t src_row_stride;     // bytes between consecutive rows of src
  int64_t dst_row_stride;     // bytes between consecutive rows of dst
  cudaStream_t stream;
};

// dst[index[i], :] = src[i, :]; every other row of dst is zero. Indices must be unique: each
// dst row is written by exactly one thread block (through `inverse`), so no atomics are needed.
struct ScatterRowsParams {
  const void* src;
  void* dst;
  const int64_t* index;       // [num_index], unique, each in [0, num_dst_rows)
  int32_t* inverse;           // workspace [num_dst_rows]: source row of each dst row, or -1
  int64_t num_index;
  int64_t num_dst_rows;
  int64_t row_bytes;
  int64_t src_row_stride;
  int64_t dst_row_stride;
  cudaStream_t stream;
};

cudaError_t gather_rows(const GatherRowsParams& p);
cudaError_t scatter_rows(const ScatterRowsParams& p);

}  // namespace fastbert
