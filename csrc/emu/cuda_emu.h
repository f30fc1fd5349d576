// The CUDA kernel emulator's force-included header: compiles csrc/*/*.cu as host C++ with g++
// (`g++ -x c++ -include csrc/emu/cuda_emu.h`), so every kernel runs on the CPU from its own source.
//
// The threads of a block run as cooperative fibers (csrc/emu/runtime.cc): a thread runs until a
// __syncthreads or a warp collective (shuffle, vote, __syncwarp, mma), then the scheduler picks the
// next one in the configured order. Blocks run one after another. Errors (deadlock, threads at
// different barriers, a bad mask, a device assert, __trap, a launch over the architecture's limits)
// end the launch with a message naming the kernel; the launcher sees it via cudaGetLastError().
#pragma once
#define FASTBERT_EMULATE 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

// ----------------------------------------------------------------------------- keywords
// cuda_runtime.h already defines __global__, __device__, __host__ as nothing for a host compiler.
#undef __shared__
#define __shared__ static  // one copy per kernel instantiation; blocks run one after another
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __maxnreg__
#define __maxnreg__(...)

namespace emu {

// What a running CUDA thread sees; g_thread points at the current fiber's.
struct ThreadCtx {
  uint3 tid;
  int linear;  // x + y * bx + z * bx * by
  int lane;
  int warp;
};
extern ThreadCtx* g_thread;
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;
extern int g_arch;  // the architecture under test, e.g. 90 for sm_90

void* dynamic_smem();
[[noreturn]] void fail(const char* file, int line, const char* what);  // ends the launch with an error
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);
uint64_t shfl_raw(int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
unsigned vote_raw(int kind, unsigned mask, bool pred, const char* file, int line);
void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const char* file,
                  int line);

void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans, const char* file, int line);
void cp_async(void* smem, const void* gmem, int bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int pending_groups);

enum ShflKind { kShflIdx = 0, kShflXor = 1, kShflUp = 2, kShflDown = 3 };
enum VoteKind { kBallot = 0, kAny = 1, kAll = 2 };

// Built-ins with default arguments, called through macros that add the call site.
struct Site {
  const char* file;
  int line;
  template <typename T>
  T shfl(int kind, unsigned mask, T v, int arg, int width) const {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value over 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = shfl_raw(kind, mask, bits, arg, width, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
  }
  template <typename T> T shfl_sync(unsigned m, T v, int src, int w = 32) const { return shfl(kShflIdx, m, v, src, w); }
  template <typename T> T shfl_xor_sync(unsigned m, T v, int x, int w = 32) const { return shfl(kShflXor, m, v, x, w); }
  template <typename T> T shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) const {
    return shfl(kShflUp, m, v, static_cast<int>(d), w);
  }
  template <typename T> T shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) const {
    return shfl(kShflDown, m, v, static_cast<int>(d), w);
  }
  void syncwarp(unsigned mask = 0xffffffffu) const { ::emu::syncwarp(mask, file, line); }
};

// ----------------------------------------------------------------------------- launches

struct LaunchInfo {
  const char* name;  // the kernel instantiation, from __PRETTY_FUNCTION__
  const void* func;
  dim3 grid, block;
  size_t smem;
  const char* file;
  int line;
};
void launch_raw(const LaunchInfo& info, void (*body)(void*), void* ctx);

template <auto F>
const char* kernel_name() {
  return __PRETTY_FUNCTION__;
}

// FASTBERT_LAUNCH(grid, block, smem, stream, kernel)(args...): the emulated `kernel<<<...>>>(args...)`.
template <auto F>
struct Launch {
  LaunchInfo info;
  Launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, const char* file, int line)
      : info{kernel_name<F>(), reinterpret_cast<const void*>(F), grid, block, smem, file, line} {}
  template <typename... A>
  void operator()(A&&... args) {
    run(F, std::forward<A>(args)...);
  }

 private:
  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;  // copied once, as the launch copies kernel arguments
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    launch_raw(info, [](void* c) {
      auto* x = static_cast<Ctx*>(c);
      std::apply(x->kernel, x->params);  // each thread gets its own copy of by-value parameters
    }, &ctx);
  }
};

}  // namespace emu

#define FASTBERT_LAUNCH(grid, block, smem, stream, ...) \
  ::emu::Launch<&__VA_ARGS__>(grid, block, smem, stream, __FILE__, __LINE__)
#define FASTBERT_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::emu::dynamic_smem())

// ----------------------------------------------------------------------------- built-in variables
#define threadIdx (::emu::g_thread->tid)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define warpSize 32

// ----------------------------------------------------------------------------- built-in functions
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) (::emu::Site{__FILE__, __LINE__}.syncwarp(__VA_ARGS__))
#define __shfl_sync(...) (::emu::Site{__FILE__, __LINE__}.shfl_sync(__VA_ARGS__))
#define __shfl_xor_sync(...) (::emu::Site{__FILE__, __LINE__}.shfl_xor_sync(__VA_ARGS__))
#define __shfl_up_sync(...) (::emu::Site{__FILE__, __LINE__}.shfl_up_sync(__VA_ARGS__))
#define __shfl_down_sync(...) (::emu::Site{__FILE__, __LINE__}.shfl_down_sync(__VA_ARGS__))
#define __ballot_sync(mask, pred) ::emu::vote_raw(::emu::kBallot, mask, (pred) != 0, __FILE__, __LINE__)
#define __any_sync(mask, pred) static_cast<int>(::emu::vote_raw(::emu::kAny, mask, (pred) != 0, __FILE__, __LINE__))
#define __all_sync(mask, pred) static_cast<int>(::emu::vote_raw(::emu::kAll, mask, (pred) != 0, __FILE__, __LINE__))
#define __trap() ::emu::fail(__FILE__, __LINE__, "__trap() called")

// Atomics: the threads of a block never run at the same time, so plain read-modify-writes.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  const T old = *address;
  *address = old < value ? value : old;
  return old;
}
template <typename T>
inline T atomicMin(T* address, T value) {
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T>
inline T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {  // byte i = byte (s >> 4i) & 7 of {y, x}
  const uint64_t xy = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((xy >> (8 * ((s >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// cuda_runtime.h's overloads for kernels (nvcc only): the same on the host.
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, F* kernel, int block_size,
                                                                 size_t dynamic_smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, reinterpret_cast<const void*>(kernel),
                                                         block_size, dynamic_smem);
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
