// Shared by every kernel file: CUDA headers only, never torch (keeps nvcc fast).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

// Launches and dynamic shared memory go through these two macros so that the kernel emulator
// (csrc/emu/cuda_emu.h, which defines them first) can compile the kernels as host C++:
//   FASTBERT_LAUNCH(grid, block, smem, stream, kernel<T>)(args...)
//     is  kernel<T><<<grid, block, smem, stream>>>(args...)
//   FASTBERT_DYNAMIC_SHARED(T, name);  is  extern __shared__ __align__(16) T name[];
#ifndef FASTBERT_LAUNCH
#define FASTBERT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef FASTBERT_DYNAMIC_SHARED
#define FASTBERT_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace fastbert {

// Element types the kernels accept; the binding file maps torch dtypes onto these.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------- occupancy
// Theoretical occupancy on sm_80 and sm_90 (64 resident warps, 32 resident blocks and 65,536
// registers per SM; registers go to a warp in units of 256, from one of the 4 schedulers' quarter of
// the file), as scripts/kernel_report.py computes it from the built kernels; shared memory aside.
// The row kernels (layernorm, bias_dropout_residual_layernorm) size their blocks with it so that
// every block size they launch keeps at least half the SM's warps resident (issue 14's bar).
constexpr int kSmMaxWarps = 64, kSmMaxBlocks = 32, kSmRegisters = 65536;

constexpr int resident_warps(int registers, int warps_per_block) {
  const int per_warp = static_cast<int>(ceil_div(registers * 32, 256)) * 256;
  const int by_registers = (kSmRegisters / 4 / per_warp) * 4 / warps_per_block;
  const int by_warps = kSmMaxWarps / warps_per_block;
  int blocks = by_registers < by_warps ? by_registers : by_warps;
  if (blocks > kSmMaxBlocks) blocks = kSmMaxBlocks;
  return blocks * warps_per_block;
}

constexpr bool meets_occupancy_bar(int registers, int warps_per_block) {
  return 2 * resident_warps(registers, warps_per_block) >= kSmMaxWarps;
}

// The register budget of a row kernel (layernorm, bias_dropout_residual_layernorm): `registers` per
// thread for blocks of at most `max_threads`, given to ptxas as __launch_bounds__(max_threads,
// kSmRegisters / (max_threads * registers)) (FASTBERT_ROW_BOUNDS). One pack per thread: 40
// registers for up to 512 threads (48 warps per SM: every block size up to 16 warps reaches 50%);
// more packs: 64 for up to 1,024 threads (32 warps: power-of-two warp counts only). Measured with
// nvcc 13.0 for sm_80 and sm_90: __maxnreg__ spilled where __launch_bounds__ with the same cap did
// not (the scalar 8-pack forward: 16-72 B under __maxnreg__(64), none under __launch_bounds__(1024,
// 1)); caps of 48 or 56, which __launch_bounds__ cannot give 512-thread blocks, are not used.
struct RowBudget {
  int registers;
  int max_threads;
};

constexpr RowBudget row_budget(int nv) { return nv == 1 ? RowBudget{40, 512} : RowBudget{64, 1024}; }

#define FASTBERT_ROW_BOUNDS(budget) \
  __launch_bounds__((budget).max_threads, ::fastbert::kSmRegisters / ((budget).max_threads * (budget).registers))

// How a row kernel covers a row of `packs` packs: nv packs per thread (1, 2, 4 or 8: a template
// argument), `threads` per block (a multiple of 32). row_launch picks the fewest packs per thread,
// then the fewest threads, with which the kernel's budget (budget(nv)) meets the occupancy bar,
// every warp holds at least one pack and 32 * warps * nv >= packs: first with at most 512 threads
// and 4 packs, then with 1,024 threads and max_nv packs. Failing all (never with the budgets above
// when max_nv packs on 1,024 threads cover the row: 512 or 1,024 threads always fit), the fewest
// threads with max_nv packs each; scripts/kernel_report.py would fail that kernel.
struct RowLaunch {
  int nv;
  int threads;
};

template <typename Budget>
constexpr RowLaunch row_launch(int64_t packs, int max_nv, Budget budget) {
  if (packs < 1) packs = 1;
  const int64_t all_busy = ceil_div(packs, 32);  // more warps than this leave one without a pack
  for (int pass = 0; pass < 2; ++pass) {
    const int max_threads = pass == 0 ? 512 : 1024;
    const int pass_nv = pass == 0 && max_nv > 4 ? 4 : max_nv;
    for (int nv = 1; nv <= pass_nv; nv *= 2) {
      const RowBudget b = budget(nv);
      const int64_t cap = (max_threads < b.max_threads ? max_threads : b.max_threads) / 32;
      const int64_t lo = ceil_div(packs, 32 * nv);
      const int64_t hi = all_busy < cap ? all_busy : cap;
      for (int64_t w = lo; w <= hi; ++w)
        if (meets_occupancy_bar(b.registers, static_cast<int>(w))) return RowLaunch{nv, static_cast<int>(w * 32)};
    }
  }
  return RowLaunch{max_nv, static_cast<int>(ceil_div(packs, 32 * max_nv) * 32)};
}

// Blocks for a grid-stride launch: enough to fill the device, never more than the work.
inline int grid_size(int64_t work_items, int items_per_block, int max_blocks = 65535 * 4) {
  int64_t blocks = ceil_div(work_items, items_per_block);
  if (blocks < 1) blocks = 1;
  return static_cast<int>(blocks < max_blocks ? blocks : max_blocks);
}

}  // namespace fastbert
