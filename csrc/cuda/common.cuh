// Device helpers shared by the CUDA kernels of the safepatch ops: exact float widening,
// round-to-nearest-even narrowing, score keys, and 4-element (vector) loads and stores.
// Tensors of any supported float dtype are passed as void* plus a dtype code, so one kernel
// serves every mix of input dtypes (the switch is uniform across a warp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../philox.h"

namespace safepatch {
namespace cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float:
      return kF32;
    case c10::ScalarType::BFloat16:
      return kBF16;
    case c10::ScalarType::Half:
      return kF16;
    default:
      TORCH_CHECK(false, "safepatch CUDA ops: unsupported dtype ", t);
  }
  return kF32;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ float bf16_to_f32(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}

__device__ __forceinline__ float f16_to_f32(uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

// Round to nearest even; NaN -> 0x7FC0 (what torch does on the CPU and the Triton kernels do).
__device__ __forceinline__ uint16_t f32_to_bf16(float f) {
  const uint32_t u = __float_as_uint(f);
  if (f != f) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ uint16_t f32_to_f16(float f) {
  return __half_as_ushort(__float2half_rn(f));
}

__device__ __forceinline__ float widen16(uint32_t bits16, int dt) {
  return dt == kBF16 ? bf16_to_f32(bits16) : f16_to_f32(bits16);
}

// Element i of a tensor of dtype dt, widened exactly to fp32.
__device__ __forceinline__ float load1(const void* p, int64_t i, int dt) {
  if (dt == kF32) return __ldg(static_cast<const float*>(p) + i);
  return widen16(__ldg(static_cast<const unsigned short*>(p) + i), dt);
}

// Elements i .. i+3 (i % 4 == 0, p 16-byte aligned): one 16-byte (fp32) or 8-byte load.
__device__ __forceinline__ void load4(const void* p, int64_t i, int dt, float v[4]) {
  if (dt == kF32) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(p) + i));
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  } else {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + i));
    v[0] = widen16(q.x & 0xFFFFu, dt);
    v[1] = widen16(q.x >> 16, dt);
    v[2] = widen16(q.y & 0xFFFFu, dt);
    v[3] = widen16(q.y >> 16, dt);
  }
}

__device__ __forceinline__ uint32_t narrow16(float f, int dt) {
  return dt == kBF16 ? f32_to_bf16(f) : f32_to_f16(f);
}

__device__ __forceinline__ void store1(void* p, int64_t i, int dt, float v) {
  if (dt == kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(narrow16(v, dt));
  }
}

__device__ __forceinline__ void store4(void* p, int64_t i, int dt, const float v[4]) {
  if (dt == kF32) {
    *reinterpret_cast<float4*>(static_cast<float*>(p) + i) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    const uint32_t lo = narrow16(v[0], dt) | (narrow16(v[1], dt) << 16);
    const uint32_t hi = narrow16(v[2], dt) | (narrow16(v[3], dt) << 16);
    *reinterpret_cast<uint2*>(static_cast<uint16_t*>(p) + i) = make_uint2(lo, hi);
  }
}

// Selection key of a score already widened to fp32 (widening is exact, so the key is the
// key of the stored value): bits of the float, -0 -> 0.
__device__ __forceinline__ uint32_t key_of(float s) {
  return score_key_from_bits(__float_as_uint(s));
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An attribute of the current device (callers hold a CUDAGuard for the tensors' device).
inline int device_attribute(cudaDeviceAttr attr) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, c10::cuda::current_device()));
  return v;
}

}  // namespace cuda
}  // namespace safepatch
