// Host emulation of the CUDA dialect used by csrc/cuda: threads run one after another (kernels
// without __syncthreads or warp operations).
#pragma once
#include "emu_fp16.h"
#include <cstring>

#include <cstdint>
#include <algorithm>
using std::min;
#include <vector_types.h>
#include <vector_functions.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
struct emu_dim { unsigned x = 0, y = 0, z = 0; };
static emu_dim threadIdx, blockIdx, blockDim, gridDim;
template <typename T> inline T __ldg(const T* p) { return *p; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
template <typename F> inline void emu_launch(int64_t blocks, int threads, size_t, F f) {
  gridDim.x = blocks; blockDim.x = threads;
  for (int64_t b = 0; b < blocks; ++b) for (int t = 0; t < threads; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
}
