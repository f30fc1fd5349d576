// Small kernels that exercise the emulator's runtime itself (tests/test_emulator.py): shuffles and
// votes, the mma.sync fragment layouts, and each error it must report instead of hanging.
#include "emu/cuda_emu.h"

#include <cassert>

#include "common.h"
#include "device_utils.cuh"

extern "C" void emu_begin(void);
extern "C" void emu_end(void);

namespace {

// out[tid * 8 + i]: xor-sum over the warp, shfl_up 1, shfl_down 3, shfl from lane 5, ballot of odd
// lanes, any(lane == 3), all(lane < 32), the sum over a width-8 segment.
__global__ void collectives_kernel(float* out) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  float v = static_cast<float>(threadIdx.x);
  float sum = v;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(full, sum, offset);
  float seg = v;
  for (int offset = 4; offset > 0; offset /= 2) seg += __shfl_xor_sync(full, seg, offset, 8);
  float* o = out + threadIdx.x * 8;
  o[0] = sum;
  o[1] = __shfl_up_sync(full, v, 1);
  o[2] = __shfl_down_sync(full, v, 3);
  o[3] = __shfl_sync(full, v, 5);
  o[4] = static_cast<float>(__ballot_sync(full, lane % 2 == 1));
  o[5] = static_cast<float>(__any_sync(full, lane == 3));
  o[6] = static_cast<float>(__all_sync(full, lane < 32));
  o[7] = seg;
}

// One m16n8k16 tile: A [16][16] row-major, Bt [8][16] (B stored n-major), D [16][8] fp32.
template <typename T>
__global__ void mma_kernel(const T* a, const T* bt, float* d) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto ld32 = [](const T* p) { return *reinterpret_cast<const uint32_t*>(p); };
  const uint32_t af[4] = {ld32(a + g * 16 + 2 * t), ld32(a + (g + 8) * 16 + 2 * t), ld32(a + g * 16 + 2 * t + 8),
                          ld32(a + (g + 8) * 16 + 2 * t + 8)};
  const uint32_t b0 = ld32(bt + g * 16 + 2 * t), b1 = ld32(bt + g * 16 + 2 * t + 8);
  float acc[4] = {1.f, 2.f, 3.f, 4.f};  // C: D = A B + C
  if constexpr (std::is_same<T, __half>::value) fastbert::mma_m16n8k16_f16(acc, af, b0, b1);
  else fastbert::mma_m16n8k16_bf16(acc, af, b0, b1);
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

__global__ void deadlock_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x % 32 == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);  // its partners wait at the barrier
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void different_barriers_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

__global__ void bad_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1);  // lanes 16..31 are not in the mask
}

__global__ void assert_kernel(float* out) {
  assert(threadIdx.x != 5 && "thread 5 is not welcome");
  out[threadIdx.x] = 1.f;
}

__global__ void trap_kernel(float* out) {
  if (threadIdx.x == 7) __trap();
  out[threadIdx.x] = 1.f;
}

// A [32][8] 16-bit matrix (four 8x8 matrices) to shared memory, then ldmatrix .x4 and .x4.trans:
// out[lane * 8 + i] = r[i] (as float bits), out[256 + lane * 8 + i] = r_trans[i].
__global__ void ldmatrix_kernel(const uint16_t* m, float* out) {
  __shared__ __align__(16) uint16_t tile[32][8];
  const int lane = threadIdx.x;
  for (int c = 0; c < 8; ++c) tile[lane][c] = m[lane * 8 + c];
  __syncwarp();
  uint32_t r[4], rt[4];
  fastbert::ldmatrix_x4(r, &tile[lane][0]);
  fastbert::ldmatrix_x4_trans(rt, &tile[lane][0]);
  for (int i = 0; i < 4; ++i) {
    std::memcpy(&out[lane * 8 + i], &r[i], 4);
    std::memcpy(&out[256 + lane * 8 + i], &rt[i], 4);
  }
}

// 64 threads copy 64 x 16 bytes to dynamic shared memory with cp.async; `wait` 0: read before
// cp.async.wait_group (the poison shows), 1: after it.
__global__ void cp_async_kernel(const float* src, float* out, int wait) {
  FASTBERT_DYNAMIC_SHARED(float, smem);
  fastbert::cp_async_16(smem + threadIdx.x * 4, src + threadIdx.x * 4);
  fastbert::cp_async_commit();
  if (wait) fastbert::cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = smem[((threadIdx.x + 1) % 64) * 4 + i];
}

// Writes a[n] of a local float a[8]: with n = 8 an out-of-bounds write on the thread's stack, for
// AddressSanitizer to report (only ever run on the ASan build).
__global__ void local_array_kernel(float* out, int n) {
  volatile float a[8];
  for (int i = 0; i <= n; ++i) a[i] = static_cast<float>(i);
  out[threadIdx.x] = a[threadIdx.x % 8];
}

}  // namespace

// which: 0 collectives (64 threads), 1 mma f16, 2 mma bf16, 3 deadlock, 4 different barriers,
// 5 bad mask, 6 assert, 7 trap, 8 ldmatrix, 9 cp.async waited for, 10 cp.async read too early,
// 11 a local array written out of bounds (ASan build only), 12 case 9 with 100 KiB of dynamic shared
// memory opted in (over sm_86/89/120's 99 KiB). Returns the cudaError_t.
extern "C" int emu_selftest(int which, const void* a, const void* b, float* out) {
  emu_begin();
  switch (which) {
    case 0: FASTBERT_LAUNCH(1, 64, 0, nullptr, collectives_kernel)(out); break;
    case 1: FASTBERT_LAUNCH(1, 32, 0, nullptr, mma_kernel<__half>)(static_cast<const __half*>(a),
                                                                    static_cast<const __half*>(b), out); break;
    case 2: FASTBERT_LAUNCH(1, 32, 0, nullptr, mma_kernel<__nv_bfloat16>)(
        static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b), out); break;
    case 3: FASTBERT_LAUNCH(2, 64, 0, nullptr, deadlock_kernel)(out); break;
    case 4: FASTBERT_LAUNCH(1, 64, 0, nullptr, different_barriers_kernel)(out); break;
    case 5: FASTBERT_LAUNCH(1, 32, 0, nullptr, bad_mask_kernel)(out); break;
    case 6: FASTBERT_LAUNCH(1, 32, 0, nullptr, assert_kernel)(out); break;
    case 7: FASTBERT_LAUNCH(1, 32, 0, nullptr, trap_kernel)(out); break;
    case 8: FASTBERT_LAUNCH(1, 32, 0, nullptr, ldmatrix_kernel)(static_cast<const uint16_t*>(a), out); break;
    case 9:
    case 10:
      FASTBERT_LAUNCH(1, 64, 64 * 16, nullptr, cp_async_kernel)(static_cast<const float*>(a), out, which == 9);
      break;
    case 11: FASTBERT_LAUNCH(1, 32, 0, nullptr, local_array_kernel)(out, 8); break;
    case 12: {
      constexpr int kBytes = 100 * 1024;
      if (cudaFuncSetAttribute(cp_async_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes) == cudaSuccess)
        FASTBERT_LAUNCH(1, 64, kBytes, nullptr, cp_async_kernel)(static_cast<const float*>(a), out, 1);
      break;
    }
    default: break;
  }
  const int err = static_cast<int>(cudaGetLastError());
  emu_end();
  return err;
}
