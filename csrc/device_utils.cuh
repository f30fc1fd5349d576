// Device helpers shared by the kernel files: element conversion, 16-byte packs, and the inline
// PTX the kernels use, each behind a wrapper with an emulated branch (csrc/emu/). CUDA headers only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include "common.h"

namespace fastbert {

// N elements of T moved as one aligned access (16 bytes when sizeof(T) * N == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// out[i] = v rounded to dtype t (round to nearest even, as torch's cast): the parameter gradients
// the reductions write in the parameter's dtype, so no cast op follows them.
__device__ __forceinline__ void store_as(void* out, DType t, int64_t i, float v) {
  if (t == DType::kFloat16) static_cast<__half*>(out)[i] = from_float<__half>(v);
  else if (t == DType::kBFloat16) static_cast<__nv_bfloat16*>(out)[i] = from_float<__nv_bfloat16>(v);
  else static_cast<float*>(out)[i] = v;
}

// d += A B for one warp: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 with the
// PTX ISA fragment layouts (g = lane / 4, t = lane % 4): a[0..3] = A[g][2t..], A[g+8][2t..],
// A[g][2t+8..], A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; d[0..3] = D[g][2t],
// D[g][2t+1], D[g+8][2t], D[g+8][2t+1]. Below sm_80 the GPU build traps.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FASTBERT_EMULATE)
  ::emu::mma_m16n8k16(false, d, a, b0, b1, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // built for sm_80 and newer only
#endif
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(FASTBERT_EMULATE)
  ::emu::mma_m16n8k16(true, d, a, b0, b1, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// 2^x as one MUFU.EX2 (ex2.approx.ftz.f32: relative error ~2^-22, subnormal results flushed to 0,
// 2^-inf = 0); exp2f elsewhere (the emulator, host code).
__device__ __forceinline__ float exp2_approx(float x) {
#if !defined(FASTBERT_EMULATE) && defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8 (8 x 16-bit elements, 16-byte aligned, shared memory). r[i] holds matrix i's
// elements [l / 4][2 (l % 4) .. +1], or with .trans its elements [2 (l % 4) .. +1][l / 4].
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(FASTBERT_EMULATE)
  ::emu::ldmatrix_x4(r, row, false, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#else
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
#if defined(FASTBERT_EMULATE)
  ::emu::ldmatrix_x4(r, row, true, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#else
  __trap();
#endif
}

// cp.async.cg.shared.global of 16 bytes, then commit_group / wait_group<N>: the copy lands in
// shared memory at some time before the wait returns (the emulator lands it at the wait in the
// forward and reverse orders, so reading before the wait sees the NaN poison, and at the issue in
// the warp order, so a buffer still read by another warp is overwritten).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#if defined(FASTBERT_EMULATE)
  ::emu::cp_async(smem, gmem, 16, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}

// cp_async_16 with zero fill: when !valid no byte is read and the 16 bytes at smem become zero
// (src-size 0), so rows past a sequence need no separate store.
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
#if defined(FASTBERT_EMULATE)
  alignas(16) static const unsigned char zeros[16] = {};
  ::emu::cp_async(smem, valid ? gmem : zeros, 16, __FILE__, __LINE__);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(valid ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(smem) = valid ? *reinterpret_cast<const uint4*>(gmem) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(FASTBERT_EMULATE)
  ::emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(FASTBERT_EMULATE)
  ::emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// at[0] += a, at[1] += b as fp32 reductions (no return value): one red.global.add.v2.f32 on
// sm_90 (at 8-byte aligned), two scalar ones before (no vector float reductions there). (ptxas
// branches around a predicated reduction, so callers arrange not to need a predicate.)
__device__ __forceinline__ void red_add_v2_f32(float* at, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(FASTBERT_EMULATE)
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(at), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(at, a);
  atomicAdd(at + 1, b);
#endif
}

// (x, y) if (bits & mask) != 0, else (0, 0): one LOP3 to a predicate and two FSEL (written as
// PTX because the compiler otherwise shifts, masks and compares per bit).
__device__ __forceinline__ void select2_if_bit(uint32_t bits, uint32_t mask, float& x, float& y) {
#if defined(__CUDA_ARCH__) && !defined(FASTBERT_EMULATE)
  asm("{ .reg .pred p; .reg .b32 m; and.b32 m, %2, %3; setp.ne.b32 p, m, 0; selp.f32 %0, %0, 0f00000000, p; "
      "selp.f32 %1, %1, 0f00000000, p; }"
      : "+f"(x), "+f"(y) : "r"(bits), "r"(mask));
#else
  if ((bits & mask) == 0u) x = y = 0.f;
#endif
}

}  // namespace fastbert
