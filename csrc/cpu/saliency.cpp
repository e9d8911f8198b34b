// score += float(scale) * (float(weight) * float(grad)), one pass, in fp32.
#include <ATen/Parallel.h>

#include "../op_checks.h"
#include "convert.h"
#include "../kernels.h"

namespace safepatch {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;

template <typename W, typename G>
void accumulate(float* __restrict__ score, const typename W::raw* __restrict__ w,
                const typename G::raw* __restrict__ g, float s, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      // Two roundings (product, then scaled product), exactly as the reference computes it.
      const float prod = W::load(w[i]) * G::load(g[i]);
      score[i] = score[i] + s * prod;
    }
  });
}

}  // namespace

void saliency_accumulate_(at::Tensor& score, const at::Tensor& weight,
                          const at::Tensor& grad, double scale) {
  check_saliency_args(score, weight, grad);
  const float s = static_cast<float>(scale);
  const int64_t n = score.numel();
  float* out = score.data_ptr<float>();
  dispatch_float(weight.scalar_type(), "weight", [&](auto wt) {
    using W = decltype(wt);
    dispatch_float(grad.scalar_type(), "grad", [&](auto gt) {
      using G = decltype(gt);
      accumulate<W, G>(out, static_cast<const typename W::raw*>(weight.data_ptr()),
                       static_cast<const typename G::raw*>(grad.data_ptr()), s, n);
    });
  });
}

}  // namespace cpu
}  // namespace safepatch
