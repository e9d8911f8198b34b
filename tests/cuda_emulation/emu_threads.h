// Host emulation with one std::thread per CUDA thread (for kernels with __syncthreads).
#pragma once
#include "emu_fp16.h"
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstring>

#include <functional>
#include <thread>
#include <vector>
#include <vector_types.h>
#include <vector_functions.h>
using std::min;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
struct emu_dim { unsigned x = 0, y = 0, z = 0; };
static thread_local emu_dim threadIdx, blockIdx;
static emu_dim blockDim, gridDim;
static thread_local uint32_t* emu_smem = nullptr;
static std::barrier<>* emu_bar = nullptr;
static std::vector<unsigned>* emu_xchg = nullptr;             // per block: one slot per thread
static unsigned long long* emu_shared_u64 = nullptr;         // per block: `__shared__ u64[2]` slots
template <typename T> inline T __ldg(const T* p) { return *p; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline void __syncthreads() { emu_bar->arrive_and_wait(); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
// Warp shuffle for code every thread of the block reaches together (a block-wide exchange).
inline unsigned __shfl_xor_sync(unsigned, unsigned v, int lane_mask) {
  (*emu_xchg)[threadIdx.x] = v;
  emu_bar->arrive_and_wait();
  const unsigned r = (*emu_xchg)[threadIdx.x ^ static_cast<unsigned>(lane_mask)];
  emu_bar->arrive_and_wait();
  return r;
}
// Each thread is its own converged group: ballots see only the calling lane.
inline unsigned __activemask() { return 1u << (threadIdx.x & 31u); }
inline unsigned __ballot_sync(unsigned mask, bool pred) { return pred ? mask : 0u; }
inline int __ffs(unsigned x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <typename F> inline void emu_launch(int64_t blocks, int threads, size_t smem_bytes, F f) {
  gridDim.x = blocks; blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b) {
    std::vector<uint32_t> smem(smem_bytes / 4 + 1, 0xDEADBEEF);  // garbage: the kernel must zero it
    std::barrier<> bar(threads);
    emu_bar = &bar;
    std::vector<unsigned> xchg(threads);
    emu_xchg = &xchg;
    unsigned long long u64[2] = {0xDEADBEEFDEADBEEFull, 0xDEADBEEFDEADBEEFull};  // garbage: the kernel must set them
    emu_shared_u64 = u64;
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t, b] { blockIdx.x = b; threadIdx.x = t; emu_smem = smem.data(); f(); });
    for (auto& th : ts) th.join();
  }
}
