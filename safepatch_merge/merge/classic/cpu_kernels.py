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
    case at::kBFloat16: { at::BFloat16* p = out.data_ptr<at::BFloat16>() + s;
      for (int64_t j = 0; j < n; ++j) p[j] = at::BFloat16(src[j]); break; }
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
        for (size_t li = 0; li < live.size(); ++li) {
          const float wi = wf[live[li]];
          const float* d = wd[li].data();
          for (int64_t j = 0; j < m; ++j) {
            const bool agree = pos[j] != 0.0f ? d[j] > 0.0f : d[j] < 0.0f;
            const float part = d[j] * (agree ? 1.0f : 0.0f);
            const float wpart = (agree ? 1.0f : 0.0f) * wi;
            if (li == 0) { o[j] = part; div[j] = wpart; }
            else { o[j] = o[j] + part; div[j] = div[j] + wpart; }
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
            digest = hashlib.sha256((_SOURCE + torch.__version__ + _cpu_id()).encode()
                                    ).hexdigest()[:12]
            mod = load_inline(name=f"safepatch_classic_{digest}", cpp_sources=[_SOURCE],
                              functions=["abs_delta", "merge"],
                              extra_cflags=["-O3", "-march=native", "-ffp-contract=off",
                                            "-fno-fast-math"],
                              verbose=False)
        except Exception as e:  # noqa: BLE001 - no compiler, no headers: fall back
            log.warning("classic merges: C++ kernels unavailable (%s: %s); using torch",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            mod = None
        _state["mod"] = mod
        return mod
