// 65536-bin histogram of one 16-bit digit of the score keys. Each worker counts a contiguous
// slice into its own histogram (no atomics); the histograms are summed at the end.
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "../op_checks.h"
#include "../philox.h"
#include "convert.h"
#include "kernels.h"

namespace safepatch {
namespace cpu {
namespace {

// Below this many elements per worker a private 512 KiB histogram costs more than it saves.
constexpr int64_t kMinPerWorker = 1 << 18;

template <typename T>
void count_slice(const typename T::raw* __restrict__ s, int64_t lo, int64_t hi, int64_t prefix,
                 int64_t digit, int64_t* __restrict__ hist) {
  if (digit == 0) {
    for (int64_t i = lo; i < hi; ++i) hist[score_key_from_bits(T::key_bits(s[i])) >> 16] += 1;
  } else {
    const uint32_t want = static_cast<uint32_t>(prefix);
    for (int64_t i = lo; i < hi; ++i) {
      const uint32_t k = score_key_from_bits(T::key_bits(s[i]));
      if ((k >> 16) == want) hist[k & 0xFFFFu] += 1;
    }
  }
}

}  // namespace

at::Tensor radix_histogram(const at::Tensor& scores, int64_t prefix, int64_t digit) {
  check_histogram_args(scores, prefix, digit);
  at::Tensor out = at::zeros({kNumBins}, scores.options().dtype(at::kLong));
  const int64_t n = scores.numel();
  int64_t* hist = out.data_ptr<int64_t>();
  const int64_t workers =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinPerWorker));
  dispatch_float(scores.scalar_type(), "scores", [&](auto tag) {
    using T = decltype(tag);
    const auto* s = static_cast<const typename T::raw*>(scores.data_ptr());
    if (workers == 1) {
      count_slice<T>(s, 0, n, prefix, digit, hist);
      return;
    }
    std::vector<int64_t> local(static_cast<size_t>(workers * kNumBins), 0);
    const int64_t per = (n + workers - 1) / workers;
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        count_slice<T>(s, w * per, std::min(n, (w + 1) * per), prefix, digit,
                       local.data() + w * kNumBins);
      }
    });
    at::parallel_for(0, kNumBins, 4096, [&](int64_t b0, int64_t b1) {
      for (int64_t w = 0; w < workers; ++w) {
        const int64_t* h = local.data() + w * kNumBins;
        for (int64_t b = b0; b < b1; ++b) hist[b] += h[b];
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace safepatch
