// score += float(scale) * (float(weight) * float(grad)), in place, fp32, one pass.
// Rounds like the reference (product, scaled product, sum: three roundings, no FMA), so the
// result is bit-identical to ops/reference.py. Each thread handles four consecutive elements
// with vector loads when every pointer is 16-byte aligned.
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

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    saliency_kernel(float* __restrict__ score, const void* __restrict__ w, int dt_w,
                    const void* __restrict__ g, int dt_g, float scale, int64_t n, bool vec) {
  const int64_t groups = ceil_div(n, 4);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < groups;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * t;
    if (vec && i0 + 4 <= n) {
      float wv[4], gv[4];
      load4(w, i0, dt_w, wv);
      load4(g, i0, dt_g, gv);
      float4 s = *reinterpret_cast<const float4*>(score + i0);
      s.x = __fadd_rn(s.x, __fmul_rn(__fmul_rn(wv[0], gv[0]), scale));
      s.y = __fadd_rn(s.y, __fmul_rn(__fmul_rn(wv[1], gv[1]), scale));
      s.z = __fadd_rn(s.z, __fmul_rn(__fmul_rn(wv[2], gv[2]), scale));
      s.w = __fadd_rn(s.w, __fmul_rn(__fmul_rn(wv[3], gv[3]), scale));
      *reinterpret_cast<float4*>(score + i0) = s;
    } else {
      for (int64_t i = i0; i < min(i0 + 4, n); ++i) {
        const float prod = __fmul_rn(load1(w, i, dt_w), load1(g, i, dt_g));
        score[i] = __fadd_rn(score[i], __fmul_rn(prod, scale));
      }
    }
  }
}

}  // namespace

void saliency_accumulate_(at::Tensor& score, const at::Tensor& weight,
                          const at::Tensor& grad, double scale) {
  check_saliency_args(score, weight, grad);
  const int64_t n = score.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(score.device());
  const bool vec = aligned16(score.data_ptr()) && aligned16(weight.data_ptr()) &&
                   aligned16(grad.data_ptr());
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t blocks = std::min<int64_t>(ceil_div(ceil_div(n, 4), kThreads), int64_t(sms) * 32);
  saliency_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                    c10::cuda::getCurrentCUDAStream()>>>(
      score.data_ptr<float>(), weight.data_ptr(), dtype_code(weight.scalar_type()),
      grad.data_ptr(), dtype_code(grad.scalar_type()), static_cast<float>(scale), n, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace safepatch
