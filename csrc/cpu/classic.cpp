// The classic merges' elementwise work (task arithmetic, TIES, DARE; docs/classic_merges.md)
// as fused loops over CPU tensors: the same float32 operations, in the same order, as the eager
// code in safepatch_merge/merge/classic/combine.py (built with -ffp-contract=off, so no
// multiply-add is fused), one pass per chunk instead of ~30. bfloat16/float16 inputs are
// widened exactly and the output rounded to nearest even once (convert.h, shared with the
// SafePatching kernels). Work goes in blocks of kBlock elements, one block per parallel item.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include "../kernels.h"
#include "../op_checks.h"
#include "convert.h"

namespace safepatch {
namespace cpu {
namespace {
constexpr int64_t kBlock = 2048;
constexpr int64_t kKindNone = 0, kKindRandom = 4;  // kinds: none, all, trim, trim0, random

// dst[j] = float32(t[s + j]) for j < n.
void widen(const at::Tensor& t, int64_t s, int64_t n, float* __restrict__ dst) {
  dispatch_float(t.scalar_type(), "input", [&](auto tag) {
    using T = decltype(tag);
    const auto* p = static_cast<const typename T::raw*>(t.data_ptr()) + s;
    for (int64_t j = 0; j < n; ++j) dst[j] = T::load(p[j]);
  });
}

// out[s + j] = src[j] rounded to out's dtype, for j < n.
void narrow(const float* __restrict__ src, int64_t n, at::Tensor& out, int64_t s) {
  dispatch_float(out.scalar_type(), "out_dtype", [&](auto tag) {
    using T = decltype(tag);
    auto* p = static_cast<typename T::raw*>(out.data_ptr()) + s;
    for (int64_t j = 0; j < n; ++j) p[j] = T::store(src[j]);
  });
}

void check_input(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, " must be a CPU tensor, got ", t.device());
  check_dense(t, op, what);
}

void check_pair(const at::Tensor& x, const at::Tensor& base, const char* op) {
  check_input(x, op, "x");
  check_input(base, op, "base");
  check_like(x, base, op, "x", "base");
}

void check_merge(const at::Tensor& base, at::TensorList xs, at::IntArrayRef kinds,
                 at::ArrayRef<double> thr, at::IntArrayRef cut, at::ArrayRef<double> fac,
                 at::ArrayRef<double> w, at::TensorList masks, c10::ScalarType out_dtype) {
  const char* op = "safepatch::classic_merge";
  check_input(base, op, "base");
  const size_t m = xs.size();
  TORCH_CHECK(kinds.size() == m && thr.size() == m && cut.size() == m && fac.size() == m &&
                  w.size() == m && masks.size() == m,
              op, ": xs, kinds, thresholds, cutoffs, factors, weights and masks must have one "
              "entry per model");
  for (size_t i = 0; i < m; ++i) {
    TORCH_CHECK(kinds[i] >= kKindNone && kinds[i] <= kKindRandom, op, ": kind must be 0..4, got ",
                num(kinds[i]));
    if (kinds[i] == kKindNone) continue;
    TORCH_CHECK(cut[i] >= 0 && cut[i] <= base.numel(), op, ": cutoff must be in [0, numel], got ",
                num(cut[i]));
    check_input(xs[i], op, "xs[i]");
    check_like(xs[i], base, op, "xs[i]", "base");
    if (kinds[i] == kKindRandom) {
      TORCH_CHECK(masks[i].scalar_type() == c10::ScalarType::Bool && masks[i].is_contiguous() &&
                      masks[i].device().is_cpu(),
                  op, ": the mask of a random-drop term must be a contiguous CPU bool tensor");
      check_like(masks[i], base, op, "masks[i]", "base");
    }
  }
  TORCH_CHECK(is_float_dtype(out_dtype), op, ": out_dtype must be float32, bfloat16 or float16");
}
}  // namespace

at::Tensor abs_delta(const at::Tensor& x, const at::Tensor& base) {
  check_pair(x, base, "safepatch::abs_delta");
  auto out = at::empty({x.numel()}, x.options().dtype(at::kFloat));
  const int64_t n = x.numel();
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> bf(kBlock), xf(kBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t s = blk * kBlock, m = std::min(kBlock, n - s);
      widen(base, s, m, bf.data());
      widen(x, s, m, xf.data());
      float* o = out.data_ptr<float>() + s;
      for (int64_t j = 0; j < m; ++j) o[j] = std::fabs(xf[j] - bf[j]);
    }
  });
  return out;
}

// 65536-bin histogram of one 16-bit digit of the keys of |x - base| (float32 bits; NaN ->
// 0x7FC00000, as ops.radix_histogram keys them): the same counts as radix_histogram on
// abs_delta's output, without writing |d| (TIES's trim needs only its k-th largest value).
at::Tensor abs_delta_histogram(const at::Tensor& x, const at::Tensor& base, int64_t prefix,
                               int64_t digit) {
  check_pair(x, base, "safepatch::abs_delta_histogram");
  TORCH_CHECK(digit == 0 || digit == 1, "safepatch::abs_delta_histogram: digit must be 0 or 1");
  const int64_t n = x.numel(), nb = (n + kBlock - 1) / kBlock;
  auto hist = at::zeros({65536}, x.options().dtype(at::kLong));
  int64_t* H = hist.data_ptr<int64_t>();
  std::mutex mu;
  const uint32_t want = static_cast<uint32_t>(prefix);
  const int64_t grain = std::max<int64_t>(1, nb / std::max(1, at::get_num_threads()));
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    // four interleaved sub-histograms for digit 0: runs of equal keys (|d| of similar size
    // share few bins) do not serialise on one counter; < 2^32 each, flushed every
    // kFlushBlocks blocks
    std::vector<uint32_t> h(digit == 0 ? 4 * 65536 : 65536, 0);
    constexpr int64_t kFlushBlocks = (int64_t(1) << 31) / kBlock;
    std::vector<float> bf(kBlock), xf(kBlock);
    std::vector<uint32_t> key(kBlock);
    auto flush = [&]() {
      std::lock_guard<std::mutex> g(mu);
      const int64_t copies = static_cast<int64_t>(h.size()) / 65536;
      for (int64_t c = 0; c < copies; ++c)
        for (int64_t i = 0; i < 65536; ++i) H[i] += h[c * 65536 + i];
      std::fill(h.begin(), h.end(), 0u);
    };
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t s = blk * kBlock, m = std::min(kBlock, n - s);
      widen(base, s, m, bf.data());
      widen(x, s, m, xf.data());
      uint32_t any = 0;
      for (int64_t j = 0; j < m; ++j) {
        const float d = std::fabs(xf[j] - bf[j]);
        uint32_t u; std::memcpy(&u, &d, 4);
        key[j] = d != d ? 0x7FC00000u : u;
        any |= static_cast<uint32_t>((key[j] >> 16) == want);
      }
      if (digit == 0) {
        uint32_t* hh = h.data();
        int64_t j = 0;
        for (; j + 4 <= m; j += 4) {
          hh[key[j] >> 16] += 1;
          hh[65536 + (key[j + 1] >> 16)] += 1;
          hh[2 * 65536 + (key[j + 2] >> 16)] += 1;
          hh[3 * 65536 + (key[j + 3] >> 16)] += 1;
        }
        for (; j < m; ++j) hh[key[j] >> 16] += 1;
      } else if (any) {
        for (int64_t j = 0; j < m; ++j)
          if ((key[j] >> 16) == want) h[key[j] & 0xFFFFu] += 1;
      }
      if ((blk - b0 + 1) % kFlushBlocks == 0) flush();
    }
    flush();
  });
  return hist;
}

at::Tensor classic_merge(const at::Tensor& base, at::TensorList xs, at::IntArrayRef kinds,
                         at::ArrayRef<double> thr, at::IntArrayRef cut, at::ArrayRef<double> fac,
                         at::ArrayRef<double> w, at::TensorList masks, bool consensus,
                         bool normalize, double lin_div, double lam, c10::ScalarType out_dtype) {
  const int64_t n = base.numel(), M = (int64_t)xs.size();
  check_merge(base, xs, kinds, thr, cut, fac, w, masks, out_dtype);
  auto out = at::empty({n}, base.options().dtype(out_dtype));
  std::vector<float> thrf(M), facf(M), wf(M);
  for (int64_t i = 0; i < M; ++i) { thrf[i] = (float)thr[i]; facf[i] = (float)fac[i];
                                    wf[i] = (float)w[i]; }
  const float divf = (float)lin_div, lamf = (float)lam;
  std::vector<int64_t> live;
  for (int64_t i = 0; i < M; ++i) if (kinds[i] != 0) live.push_back(i);
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> bf(kBlock), xf(kBlock), mixed(kBlock), div(kBlock), pos(kBlock);
    std::vector<std::vector<float>> wd(live.size(), std::vector<float>(kBlock));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t s = blk * kBlock, m = std::min(kBlock, n - s);
      widen(base, s, m, bf.data());
      for (size_t li = 0; li < live.size(); ++li) {
        const int64_t i = live[li];
        widen(xs[i], s, m, xf.data());
        float* d = wd[li].data();
        const int64_t k = kinds[i];
        const bool* mk = k == 4 ? masks[i].data_ptr<bool>() + s : nullptr;
        const float t = thrf[i], f = facf[i], wi = wf[i];
        const bool scaled = f != 1.0f;
        // one branch-free loop per kind, so each vectorizes
        for (int64_t j = 0; j < m; ++j) d[j] = xf[j] - bf[j];
        if (k == 2) {
          // ties at t are kept before the cutoff index, dropped from it on (exactly k kept)
          const int64_t c = std::min(std::max<int64_t>(cut[i] - s, 0), m);
          for (int64_t j = 0; j < c; ++j) d[j] = d[j] * (std::fabs(d[j]) >= t ? 1.0f : 0.0f);
          for (int64_t j = c; j < m; ++j) d[j] = d[j] * (std::fabs(d[j]) > t ? 1.0f : 0.0f);
        } else if (k == 3) for (int64_t j = 0; j < m; ++j) d[j] = d[j] * (std::fabs(d[j]) > 0.0f ? 1.0f : 0.0f);
        else if (k == 4) for (int64_t j = 0; j < m; ++j) d[j] = d[j] * (mk[j] ? 1.0f : 0.0f);
        if (scaled) for (int64_t j = 0; j < m; ++j) d[j] = d[j] * f;
        for (int64_t j = 0; j < m; ++j) d[j] = d[j] * wi;
      }
      float* o = mixed.data();
      if (live.empty()) {
        narrow(bf.data(), m, out, s);
        continue;
      }
      if (consensus) {
        for (int64_t j = 0; j < m; ++j) o[j] = wd[0][j];
        for (size_t li = 1; li < live.size(); ++li)
          for (int64_t j = 0; j < m; ++j) o[j] = o[j] + wd[li][j];
        for (int64_t j = 0; j < m; ++j) pos[j] = o[j] >= 0.0f ? 1.0f : 0.0f;
        // agree = d > 0 where the elected sign is +, d < 0 where it is -, as 1.0f / 0.0f
        // arithmetic (pos is exactly 0 or 1) and one loop per case: with the conditional
        // form and the li == 0 test inside, this stayed scalar (TIES 9.9 vs 2.4 ns/element
        // for task arithmetic, one core).
        for (size_t li = 0; li < live.size(); ++li) {
          const float wi = wf[live[li]];
          const float* d = wd[li].data();
          float* dv = div.data();
          if (li == 0) {
            for (int64_t j = 0; j < m; ++j) {
              const float a = pos[j] * (d[j] > 0.0f ? 1.0f : 0.0f) +
                              (1.0f - pos[j]) * (d[j] < 0.0f ? 1.0f : 0.0f);
              o[j] = d[j] * a;
              dv[j] = a * wi;
            }
          } else {
            for (int64_t j = 0; j < m; ++j) {
              const float a = pos[j] * (d[j] > 0.0f ? 1.0f : 0.0f) +
                              (1.0f - pos[j]) * (d[j] < 0.0f ? 1.0f : 0.0f);
              o[j] = o[j] + d[j] * a;
              dv[j] = dv[j] + a * wi;
            }
          }
        }
        if (normalize)
          for (int64_t j = 0; j < m; ++j) o[j] = o[j] / (div[j] == 0.0f ? 1.0f : div[j]);
      } else {
        for (int64_t j = 0; j < m; ++j) o[j] = wd[0][j];
        for (size_t li = 1; li < live.size(); ++li)
          for (int64_t j = 0; j < m; ++j) o[j] = o[j] + wd[li][j];
        if (normalize) for (int64_t j = 0; j < m; ++j) o[j] = o[j] / divf;
      }
      if (lam != 1.0) for (int64_t j = 0; j < m; ++j) o[j] = o[j] * lamf;
      for (int64_t j = 0; j < m; ++j) o[j] = o[j] + bf[j];
      narrow(o, m, out, s);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace safepatch
