// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", Random123): the
// counter-based generator behind every dropout mask in fastbert (attention, row dropout). A pure
// function of (counter, key), so a backward regenerates its forward's mask; the Python twins
// (fastbert/ops/attention.py: philox4x32_10) compute it bit for bit. CUDA headers only.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace fastbert {

__host__ __device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
#ifdef __CUDA_ARCH__
    const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), hi1 = __umulhi(0xCD9E8D57u, c.z);
#else
    const uint32_t hi0 = static_cast<uint32_t>((uint64_t(0xD2511F53u) * c.x) >> 32);
    const uint32_t hi1 = static_cast<uint32_t>((uint64_t(0xCD9E8D57u) * c.z) >> 32);
#endif
    const uint32_t lo0 = 0xD2511F53u * c.x, lo1 = 0xCD9E8D57u * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += 0x9E3779B9u;
    k.y += 0xBB67AE85u;
  }
  return c;
}

__host__ __device__ __forceinline__ uint2 philox_key(uint64_t seed) {
  return make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace fastbert
