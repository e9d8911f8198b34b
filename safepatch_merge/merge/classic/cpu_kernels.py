"""Fused C++ loops of the classic merges for CPU tensors (built once per machine, JIT).

The same float32 operations, in the same order, as the eager code in :mod:`.combine`
(compiled with -ffp-contract=off so no multiply-add is fused, -march=native for the
machine's vector width), one pass per chunk instead of
~30; bfloat16/float16 inputs are widened exactly and the output rounded to nearest even once.
Loading a built extension costs about a second (torch.compile's tracing costs far more on a
small CPU). The build lives in torch's extension cache (~/.cache/torch_extensions), keyed by
a hash of this source, the torch version and the CPU model and flags.
"""
from __future__ import annotations

import hashlib
import logging
import threading

import torch

log = logging.getLogger("safepatch_merge.merge")

KIND_NONE, KIND_ALL, KIND_TRIM, KIND_TRIM0, KIND_RANDOM = 0, 1, 2, 3, 4

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

namespace {
constexpr int64_t kBlock = 2048;

void widen(const torch::Tensor& t, int64_t s, int64_t n, float* dst) {
  switch (t.scalar_type()) {
    case at::kFloat: { const float* p = t.data_ptr<float>() + s;
      for (int64_t j = 0; j < n; ++j) dst[j] = p[j]; break; }
    case at::kBFloat16: { const uint16_t* p = reinterpret_cast<const uint16_t*>(
        t.data_ptr<at::BFloat16>()) + s;
      for (int64_t j = 0; j < n; ++j) { uint32_t u = uint32_t(p[j]) << 16; float f;
        std::memcpy(&f, &u, 4); dst[j] = f; } break; }
    case at::kHalf: { const at::Half* p = t.data_ptr<at::Half>() + s;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(p[j]); break; }
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void narrow(const float* src, int64_t n, torch::Tensor& out, int64_t s) {
  switch (out.scalar_type()) {
    case at::kFloat: { float* p = out.data_ptr<float>() + s;
      for (int64_t j = 0; j < n; ++j) p[j] = src[j]; break; }
    case at::kBFloat16: {
      // c10's round to nearest even (NaN -> 0x7FC0) in integer ops, without its branch, so
      // the loop vectorises (at::BFloat16(float) per element kept it scalar: ~2 ns/element)
      uint16_t* p = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + s;
      for (int64_t j = 0; j < n; ++j) {
        uint32_t u; std::memcpy(&u, &src[j], 4);
        const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        p[j] = static_cast<uint16_t>(src[j] != src[j] ? 0x7FC0u : r);
      }
      break; }
    case at::kHalf: { at::Half* p = out.data_ptr<at::Half>() + s;
      for (int64_t j = 0; j < n; ++j) p[j] = at::Half(src[j]); break; }
    default: TORCH_CHECK(false, "unsupported dtype ", out.scalar_type());
  }
}
}  // namespace

torch::Tensor abs_delta(torch::Tensor x, torch::Tensor base) {
  auto out = torch::empty({x.numel()}, x.options().dtype(at::kFloat));
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
torch::Tensor abs_delta_histogram(torch::Tensor x, torch::Tensor base, int64_t prefix,
                                  int64_t digit) {
  TORCH_CHECK(digit == 0 || digit == 1, "abs_delta_histogram: digit must be 0 or 1");
  const int64_t n = x.numel(), nb = (n + kBlock - 1) / kBlock;
  auto hist = torch::zeros({65536}, torch::kLong);
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

torch::Tensor merge(torch::Tensor base, std::vector<torch::Tensor> xs, std::vector<int64_t> kinds,
                    std::vector<double> thr, std::vector<double> fac, std::vector<double> w,
                    std::vector<torch::Tensor> masks, bool consensus, bool normalize,
                    double lin_div, double lam, int64_t out_dtype) {
  const int64_t n = base.numel(), M = (int64_t)xs.size();
  auto out = torch::empty({n}, base.options().dtype(static_cast<at::ScalarType>(out_dtype)));
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
        if (k == 2) for (int64_t j = 0; j < m; ++j) d[j] = d[j] * (std::fabs(d[j]) >= t ? 1.0f : 0.0f);
        else if (k == 3) for (int64_t j = 0; j < m; ++j) d[j] = d[j] * (std::fabs(d[j]) > 0.0f ? 1.0f : 0.0f);
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
"""

def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return ""
    import re

    model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return (model.group(1) if model else "") + "|" + (flags.group(1) if flags else "")


# -fopenmp: at::parallel_for is OpenMP in the headers and runs serially in a translation unit
# built without it. The flags are part of the build's name.
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fopenmp"]
_lock = threading.Lock()
_state: dict = {}


def load():
    """The built extension module, or None (build failed; logged once)."""
    with _lock:
        if "mod" in _state:
            return _state["mod"]
        try:
            from torch.utils.cpp_extension import load_inline

            # -march=native code must never load on another CPU model: the name carries it
            digest = hashlib.sha256((_SOURCE + repr(_CFLAGS) + torch.__version__ + _cpu_id())
                                    .encode()).hexdigest()[:12]
            mod = load_inline(name=f"safepatch_classic_{digest}", cpp_sources=[_SOURCE],
                              functions=["abs_delta", "abs_delta_histogram", "merge"],
                              extra_cflags=_CFLAGS,
                              extra_ldflags=["-fopenmp"],
                              verbose=False)
        except Exception as e:  # noqa: BLE001 - no compiler, no headers: fall back
            log.warning("classic merges: C++ kernels unavailable (%s: %s); using torch",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            mod = None
        _state["mod"] = mod
        return mod
