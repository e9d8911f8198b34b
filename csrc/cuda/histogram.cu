// 65536-bin histogram of one 16-bit digit of the score keys (keys: bits of float32(score),
// -0 -> 0; digit 0 bins key >> 16, digit 1 bins key & 0xFFFF over key >> 16 == prefix).
//
// Each block keeps a private sub-histogram of all 65,536 bins in shared memory as packed
// 16-bit counters (two bins per 32-bit word, 128 KiB), so the per-element work is one
// shared-memory atomic and global memory sees one atomic per non-empty bin per round. A round
// is at most kRound elements per block, so no 16-bit counter can overflow; after each round the
// block adds its non-zero counters into the int64 output and clears them. One block per SM
// (the sub-histogram takes most of the SM's shared memory), 1024 threads, 16-byte loads.
// Devices with less than 128 KiB of opt-in shared memory per block use global atomics.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../op_checks.h"
#include "common.cuh"
#include "kernels.h"

namespace safepatch {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWords = 32768;                 // 65536 16-bit counters
constexpr int kSmemBytes = kWords * 4;        // 128 KiB
constexpr int kVecMax = 8;                    // elements per 16-byte load (16-bit dtypes)
constexpr int kUnroll = 2;                    // 16-byte loads in flight per thread
constexpr int64_t kRound = 7 * kThreads * kVecMax;  // 57344 <= 65535: counters cannot overflow
static_assert(kRound % (kThreads * kVecMax) == 0 && kRound <= 65535, "16-bit counters");

// Adds one key to the packed shared sub-histogram. Bin 0 (zero scores: often most of an
// embedding's) is warp-aggregated, one shared atomic per warp instead of up to 32 on one word.
__device__ __forceinline__ void count(uint32_t* sh, float s, int digit, uint32_t prefix) {
  const uint32_t key = key_of(s);
  bool take = true;
  uint32_t bin;
  if (digit == 0) {
    bin = key >> 16;
  } else {
    take = (key >> 16) == prefix;
    bin = key & 0xFFFFu;
  }
  const unsigned active = __activemask();
  const unsigned zeros = __ballot_sync(active, take && bin == 0u);
  if (take && bin != 0u) atomicAdd(sh + (bin >> 1), 1u << ((bin & 1u) << 4));
  if (zeros != 0u && static_cast<int>(threadIdx.x & 31u) == __ffs(active) - 1) {
    atomicAdd(sh, static_cast<uint32_t>(__popc(zeros)));  // bin 0: low half of word 0
  }
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
                            uint32_t prefix, bool vec, unsigned long long* __restrict__ out) {
  extern __shared__ uint32_t sh[];
  for (int w = threadIdx.x; w < kWords; w += blockDim.x) sh[w] = 0;
  __syncthreads();
  for (int64_t r0 = blockIdx.x * kRound; r0 < n; r0 += static_cast<int64_t>(gridDim.x) * kRound) {
    const int64_t r1 = min(r0 + kRound, n);
    if (vec && r1 - r0 == kRound) {
      // Whole round, aligned: kUnroll 16-byte loads in flight per thread, then count.
      for (int64_t i = r0 + threadIdx.x * VEC; i < r1; i += int64_t(kThreads) * VEC * kUnroll) {
        float v[kUnroll][VEC];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t j = i + int64_t(u) * kThreads * VEC;
          if (j < r1) load_chunk<VEC>(x, j, dt, v[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (i + int64_t(u) * kThreads * VEC >= r1) break;
#pragma unroll
          for (int k = 0; k < VEC; ++k) count(sh, v[u][k], digit, prefix);
        }
      }
    } else {
      for (int64_t i = r0 + threadIdx.x; i < r1; i += kThreads) count(sh, load1(x, i, dt), digit, prefix);
    }
    __syncthreads();
    for (int w = threadIdx.x; w < kWords; w += blockDim.x) {
      const uint32_t c = sh[w];
      if (c == 0) continue;
      if (c & 0xFFFFu) atomicAdd(out + 2 * w, static_cast<unsigned long long>(c & 0xFFFFu));
      if (c >> 16) atomicAdd(out + 2 * w + 1, static_cast<unsigned long long>(c >> 16));
      sh[w] = 0;
    }
    __syncthreads();
  }
}

__global__ void histogram_global_kernel(const void* __restrict__ x, int dt, int64_t n, int digit,
                                        uint32_t prefix, unsigned long long* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t key = key_of(load1(x, i, dt));
    if (digit == 0) {
      atomicAdd(out + (key >> 16), 1ull);
    } else if ((key >> 16) == prefix) {
      atomicAdd(out + (key & 0xFFFFu), 1ull);
    }
  }
}

template <int VEC>
void launch_shared(const at::Tensor& scores, int dt, int64_t n, int digit, uint32_t prefix,
                   unsigned long long* out, int sms) {
  auto kernel = histogram_shared_kernel<VEC>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const int64_t blocks = std::min<int64_t>(ceil_div(n, kRound), sms);
  const bool vec = aligned16(scores.data_ptr());
  kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, c10::cuda::getCurrentCUDAStream()>>>(
      scores.data_ptr(), dt, n, digit, prefix, vec, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor radix_histogram(const at::Tensor& scores, int64_t prefix, int64_t digit) {
  check_histogram_args(scores, prefix, digit);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::zeros({kNumBins}, scores.options().dtype(at::kLong));
  const int64_t n = scores.numel();
  if (n == 0) return out;
  const int dt = dtype_code(scores.scalar_type());
  const uint32_t want = digit == 0 ? 0u : static_cast<uint32_t>(prefix);
  auto* hist = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  if (device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin) >= kSmemBytes) {
    if (dt == kF32) {
      launch_shared<4>(scores, dt, n, static_cast<int>(digit), want, hist, sms);
    } else {
      launch_shared<8>(scores, dt, n, static_cast<int>(digit), want, hist, sms);
    }
  } else {
    const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), int64_t(sms) * 32);
    histogram_global_kernel<<<static_cast<unsigned>(blocks), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        scores.data_ptr(), dt, n, static_cast<int>(digit), want, hist);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace cuda
}  // namespace safepatch
