// 65536-bin histogram of one 16-bit digit of the score keys (keys: bits of float32(score),
// -0 -> 0; digit 0 bins key >> 16, digit 1 bins key & 0xFFFF over key >> 16 == prefix).
//
// Each block keeps a private sub-histogram of all 65,536 bins in shared memory as packed
// 16-bit counters (two bins per 32-bit word, 128 KiB), so the per-element work is one
// shared-memory atomic. A counter never overflows: the thread whose increment carries it to
// 0x8000 moves those 32768 counts to the int64 output at once (one global atomic, rare), so the
// block streams its whole grid-stride share without stopping and adds its non-zero counters to
// the output once, at the end (emptying it every 57,344 elements instead, behind two barriers,
// scans 32,768 words per round with no loads in flight and costs a third of the bandwidth).
// A counter can exceed 0x8000 only by the increments that land between the carrying thread's
// atomic and its subtraction (at most one per resident thread, 1024), far below 0xFFFF.
// One block per SM (the sub-histogram takes most of the SM's shared memory), 1024 threads,
// kUnroll 16-byte loads in flight per thread. Devices with less than 128 KiB of opt-in shared
// memory per block use global atomics.
// Histograms of retained scores (keep_threshold < 2^32): each thread takes whole Philox counter
// blocks (four elements at absolute indices 4*blk ..), one Philox call per block, and a dropped
// element counts as key 0 unless its key is invalid (>= 0x7F800000); digit 1 under a non-zero
// prefix draws only for blocks holding a key under the prefix.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../op_checks.h"
#include "common.cuh"
#include "../kernels.h"

namespace safepatch {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWords = 32768;                 // 65536 16-bit counters
constexpr int kSmemBytes = kWords * 4;        // 128 KiB
constexpr int kUnroll = 4;                    // 16-byte loads in flight per thread
constexpr uint32_t kCarry = 0x8000u;          // counts moved to global memory at a time

// The retention draw of a histogram of retained scores (draw false: plain histogram).
struct Draw {
  bool draw;
  uint32_t keep, seed, name_hash, patch_id;
  int64_t offset;  // absolute index of element 0 of the scores inside their tensor
};

// Adds `add` to bin `bin` of the packed shared sub-histogram; moves kCarry counts to the output
// when this addition carries the counter across kCarry.
__device__ __forceinline__ void bump(uint32_t* sh, uint32_t bin, uint32_t add,
                                     unsigned long long* __restrict__ out) {
  const uint32_t shift = (bin & 1u) << 4;
  const uint32_t old = (atomicAdd(sh + (bin >> 1), add << shift) >> shift) & 0xFFFFu;
  if (old < kCarry && old + add >= kCarry) {
    atomicSub(sh + (bin >> 1), kCarry << shift);
    atomicAdd(out + bin, static_cast<unsigned long long>(kCarry));
  }
}

// Counts one score. Bin 0 (zero scores: most of an embedding's, whose unused rows get no
// gradient) is counted in a register per thread and summed once at the end, so runs of zeros
// neither serialise on one shared word nor cost a warp vote per element (run 3 on the H200
// spent ~1/3 of the pass on the per-element __ballot_sync that aggregated them before).
__device__ __forceinline__ void count_key(uint32_t* sh, uint32_t key, int digit, uint32_t prefix,
                                          uint32_t& zeros, unsigned long long* __restrict__ out) {
  uint32_t bin;
  if (digit == 0) {
    bin = key >> 16;
  } else {
    if ((key >> 16) != prefix) return;
    bin = key & 0xFFFFu;
  }
  if (bin == 0u) {
    ++zeros;
  } else {
    bump(sh, bin, 1u, out);
  }
}

__device__ __forceinline__ void count(uint32_t* sh, float s, int digit, uint32_t prefix,
                                      uint32_t& zeros, unsigned long long* __restrict__ out) {
  count_key(sh, key_of(s), digit, prefix, zeros, out);
}

// Retained keys of counter block `blk` (chunk-local first element i0 = 4*blk - offset): a
// dropped valid score becomes key 0. Returns false when no element of the block can count
// (digit 1, non-zero prefix, no key under it), without drawing.
__device__ __forceinline__ bool retained_block(const void* x, int dt, int64_t n, int64_t blk,
                                               bool vec, int digit, uint32_t prefix,
                                               const Draw& d, bool valid[4], uint32_t key[4]) {
  const int64_t i0 = 4 * blk - d.offset;
  float v[4];
  if (vec && i0 >= 0 && i0 + 4 <= n) {
    load4(x, i0, dt, v);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = i0 + j >= 0 && i0 + j < n ? load1(x, i0 + j, dt) : 0.f;
  }
  bool need = false;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    valid[j] = i0 + j >= 0 && i0 + j < n;
    key[j] = key_of(v[j]);
    need = need || (valid[j] && (digit == 0 || prefix == 0u || (key[j] >> 16) == prefix));
  }
  if (!need) return false;
  uint32_t w[4];
  retention_block(static_cast<uint64_t>(blk), d.seed, d.name_hash, d.patch_id, w);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (!(w[j] < d.keep) && key[j] < 0x7F800000u) key[j] = 0u;
  }
  return true;
}

// Elements [i, i + VEC) of a 16-byte chunk, widened to fp32.
template <int VEC>
__device__ __forceinline__ void load_chunk(const void* x, int64_t i, int dt, float v[VEC]) {
  if (VEC == 4) {
    load4(x, i, dt, v);
  } else {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + i));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = widen16(w[k] & 0xFFFFu, dt);
      v[2 * k + 1] = widen16(w[k] >> 16, dt);
    }
  }
}

template <int VEC>
__global__ void __launch_bounds__(kThreads)
    histogram_shared_kernel(const void* __restrict__ x, int dt, int64_t n, int digit,
                            uint32_t prefix, bool vec, const Draw d,
                            unsigned long long* __restrict__ out) {
  extern __shared__ uint32_t sh[];
  __shared__ unsigned long long block_zeros;
  for (int w = threadIdx.x; w < kWords; w += blockDim.x) sh[w] = 0;
  if (threadIdx.x == 0) block_zeros = 0;
  __syncthreads();
  uint32_t zeros = 0;  // < 2^32: a thread sees at most n / (gridDim.x * kThreads) elements
  if (d.draw) {
    const int64_t blk0 = d.offset >> 2;
    const int64_t nblk = ((d.offset + n - 1) >> 2) - blk0 + 1;
    for (int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x; t < nblk;
         t += int64_t(gridDim.x) * kThreads) {
      bool valid[4];
      uint32_t key[4];
      if (!retained_block(x, dt, n, blk0 + t, vec, digit, prefix, d, valid, key)) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (valid[j]) count_key(sh, key[j], digit, prefix, zeros, out);
    }
  } else {
    // Vector part: whole groups of kUnroll chunks per thread, grid-stride; the rest, one by one.
    const int64_t step = int64_t(gridDim.x) * kThreads * VEC;  // elements per grid-wide chunk row
    const int64_t group = step * kUnroll;
    const int64_t n_vec = vec ? n / group * group : 0;
    for (int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * VEC; i < n_vec; i += group) {
      float v[kUnroll][VEC];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_chunk<VEC>(x, i + u * step, dt, v[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) count(sh, v[u][k], digit, prefix, zeros, out);
      }
    }
    for (int64_t i = n_vec + int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n;
         i += int64_t(gridDim.x) * kThreads) {
      count(sh, load1(x, i, dt), digit, prefix, zeros, out);
    }
  }
  uint32_t warp_zeros = zeros;  // every thread of the block gets here: full-warp shuffles
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) warp_zeros += __shfl_xor_sync(0xFFFFFFFFu, warp_zeros, d);
  if ((threadIdx.x & 31u) == 0 && warp_zeros != 0u) {
    atomicAdd(&block_zeros, static_cast<unsigned long long>(warp_zeros));
  }
  __syncthreads();
  if (threadIdx.x == 0 && block_zeros != 0) atomicAdd(out, block_zeros);
  for (int w = threadIdx.x; w < kWords; w += blockDim.x) {
    const uint32_t c = sh[w];
    if (c == 0) continue;
    if (c & 0xFFFFu) atomicAdd(out + 2 * w, static_cast<unsigned long long>(c & 0xFFFFu));
    if (c >> 16) atomicAdd(out + 2 * w + 1, static_cast<unsigned long long>(c >> 16));
  }
}

__global__ void histogram_global_kernel(const void* __restrict__ x, int dt, int64_t n, int digit,
                                        uint32_t prefix, const Draw d,
                                        unsigned long long* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t key = key_of(load1(x, i, dt));
    // Fallback for devices without 128 KiB of shared memory: one Philox call per element.
    if (d.draw && key < 0x7F800000u &&
        !(retention_word(static_cast<uint64_t>(d.offset + i), d.seed, d.name_hash, d.patch_id) < d.keep)) {
      key = 0u;
    }
    if (digit == 0) {
      atomicAdd(out + (key >> 16), 1ull);
    } else if ((key >> 16) == prefix) {
      atomicAdd(out + (key & 0xFFFFu), 1ull);
    }
  }
}

template <int VEC>
void launch_shared(const at::Tensor& scores, int dt, int64_t n, int digit, uint32_t prefix,
                   const Draw& d, unsigned long long* out, int sms) {
  auto kernel = histogram_shared_kernel<VEC>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  // One block per SM, fewer for small inputs (each block zeroes and scans 128 KiB of counters).
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, int64_t(kThreads) * VEC * kUnroll), sms));
  // Retained scores load whole counter blocks: vector loads need block-aligned chunks.
  const bool vec = aligned16(scores.data_ptr()) && (!d.draw || d.offset % 4 == 0);
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, c10::cuda::getCurrentCUDAStream()>>>(
      scores.data_ptr(), dt, n, digit, prefix, vec, d, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor radix_histogram(const at::Tensor& scores, int64_t prefix, int64_t digit,
                           int64_t keep_threshold, int64_t seed, int64_t name_hash,
                           int64_t patch_id, int64_t offset) {
  check_histogram_args(scores, prefix, digit, keep_threshold, name_hash, patch_id, offset);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::zeros({kNumBins}, scores.options().dtype(at::kLong));
  const int64_t n = scores.numel();
  if (n == 0) return out;
  const int dt = dtype_code(scores.scalar_type());
  const uint32_t want = digit == 0 ? 0u : static_cast<uint32_t>(prefix);
  Draw d{};
  d.draw = keep_threshold < kKeepAll;
  d.keep = d.draw ? static_cast<uint32_t>(keep_threshold) : 0u;
  d.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  d.name_hash = static_cast<uint32_t>(name_hash);
  d.patch_id = static_cast<uint32_t>(patch_id);
  d.offset = offset;
  auto* hist = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  if (device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) >= kSmemBytes) {
    if (dt == kF32) {
      launch_shared<4>(scores, dt, n, static_cast<int>(digit), want, d, hist, sms);
    } else {
      launch_shared<8>(scores, dt, n, static_cast<int>(digit), want, d, hist, sms);
    }
  } else {
    const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), int64_t(sms) * 32);
    histogram_global_kernel<<<static_cast<unsigned>(blocks), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        scores.data_ptr(), dt, n, static_cast<int>(digit), want, d, hist);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace cuda
}  // namespace safepatch
