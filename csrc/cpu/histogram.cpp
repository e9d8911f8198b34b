// 65536-bin histogram of one 16-bit digit of the score keys. Each worker counts a contiguous
// slice into its own histogram (no atomics); the histograms are summed at the end. With a
// retention draw (keep_threshold < 2^32) the keys are those of the retained scores: a dropped
// element counts as key 0 unless its key is invalid (>= 0x7F800000).
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "../op_checks.h"
#include "../philox.h"
#include "convert.h"
#include "../kernels.h"
#include "philox_lanes.h"

namespace safepatch {
namespace cpu {
namespace {

// Below this many elements per worker a private 512 KiB histogram costs more than it saves.
constexpr int64_t kMinPerWorker = 1 << 18;

// score_key_from_bits for the scalar scatter loops: valid scores (zero, positive, +inf) take
// one predictable branch; -0, negatives and NaN take the exact general path. (The general
// function's branch-free masks suit vector loops; here they cost 1.5x on digit 0.)
inline uint32_t scatter_key(uint32_t bits) {
  return bits <= 0x7F800000u ? bits : score_key_from_bits(bits);
}

// digit 0: four interleaved 32-bit sub-histograms, so runs of equal keys (the common case:
// scores share few exponents) do not serialise on one counter; flushed into the int64 bins
// before any sub-count could wrap. digit 1: only the elements under `prefix` are counted, so
// a vectorised test skips the blocks without any (the vast majority).
template <typename T>
void count_slice(const typename T::raw* __restrict__ s, int64_t lo, int64_t hi, int64_t prefix,
                 int64_t digit, int64_t* __restrict__ hist) {
  if (digit == 0) {
    std::vector<uint32_t> sub(static_cast<size_t>(4 * kNumBins), 0);
    uint32_t* __restrict__ h = sub.data();
    constexpr int64_t kFlush = int64_t(1) << 31;  // < 2^32 increments per sub-histogram
    for (int64_t f0 = lo; f0 < hi; f0 += kFlush) {
      const int64_t f1 = std::min(hi, f0 + kFlush);
      int64_t i = f0;
      for (; i + 4 <= f1; i += 4) {
        h[scatter_key(T::key_bits(s[i])) >> 16] += 1;
        h[kNumBins + (scatter_key(T::key_bits(s[i + 1])) >> 16)] += 1;
        h[2 * kNumBins + (scatter_key(T::key_bits(s[i + 2])) >> 16)] += 1;
        h[3 * kNumBins + (scatter_key(T::key_bits(s[i + 3])) >> 16)] += 1;
      }
      for (; i < f1; ++i) h[scatter_key(T::key_bits(s[i])) >> 16] += 1;
      for (int64_t b = 0; b < kNumBins; ++b) {
        hist[b] += static_cast<int64_t>(h[b]) + h[kNumBins + b] + h[2 * kNumBins + b] +
                   h[3 * kNumBins + b];
      }
      std::fill(sub.begin(), sub.end(), 0u);
    }
  } else {
    const uint32_t want = static_cast<uint32_t>(prefix);
    constexpr int64_t kBlock = 64;
    for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
      const int64_t b1 = std::min(hi, b0 + kBlock);
      uint32_t any = 0;
      for (int64_t i = b0; i < b1; ++i) {
        any |= static_cast<uint32_t>((score_key_from_bits(T::key_bits(s[i])) >> 16) == want);
      }
      if (!any) continue;
      for (int64_t i = b0; i < b1; ++i) {
        const uint32_t k = scatter_key(T::key_bits(s[i]));
        if ((k >> 16) == want) hist[k & 0xFFFFu] += 1;
      }
    }
  }
}

// The retention draw of a histogram of retained scores.
struct Draw {
  int64_t offset;  // absolute index of the tensor's element 0 of this call's scores
  uint32_t keep, seed, name_hash, patch_id;
};

constexpr int kDrawLanes = 128;                // Philox blocks per tile
constexpr int64_t kDrawTile = 4 * kDrawLanes;  // elements per tile, aligned to absolute indices

// count_slice for retained scores: tiles aligned to absolute element indices, one Philox call
// per four elements. digit 1 under a non-zero prefix only needs the words of the keys under
// the prefix (a dropped element's key 0 is never counted there): none for a tile without such
// keys, one Philox call per key for a tile with few.
template <typename T>
void count_slice_retained(const typename T::raw* __restrict__ s, int64_t lo, int64_t hi,
                          int64_t prefix, int64_t digit, const Draw& d,
                          int64_t* __restrict__ hist) {
  alignas(64) uint32_t words[kDrawTile];
  alignas(64) uint32_t keys[kDrawTile];
  const uint32_t want = static_cast<uint32_t>(prefix);
  // digit 0: four interleaved 32-bit sub-histograms, as in count_slice (a slice shorter
  // than the bins counts straight into `hist`: zeroing and flushing them would cost more).
  const bool direct = digit == 0 && hi - lo < kNumBins;
  std::vector<uint32_t> sub(digit == 0 && !direct ? static_cast<size_t>(4 * kNumBins) : 0, 0);
  uint32_t* __restrict__ h = sub.data();
  int64_t pending = 0;  // increments in `sub` since its last flush
  auto flush = [&] {
    for (int64_t b = 0; b < kNumBins; ++b) {
      hist[b] += static_cast<int64_t>(h[b]) + h[kNumBins + b] + h[2 * kNumBins + b] +
                 h[3 * kNumBins + b];
    }
    std::fill(sub.begin(), sub.end(), 0u);
    pending = 0;
  };
  int64_t i = lo;
  while (i < hi) {
    const uint64_t a = static_cast<uint64_t>(d.offset + i);
    const uint64_t tile0 = a / kDrawTile * kDrawTile;
    const int64_t end = std::min<int64_t>(hi, static_cast<int64_t>(tile0 + kDrawTile) - d.offset);
    const int64_t n = end - i;
    const int64_t sh = static_cast<int64_t>(a - tile0);
    uint32_t matches = 0;
    for (int64_t k = 0; k < n; ++k) {
      keys[k] = score_key_from_bits(T::key_bits(s[i + k]));
      matches += static_cast<uint32_t>((keys[k] >> 16) == want);
    }
    if (digit == 1 && want != 0 && matches * 8 < static_cast<uint32_t>(n)) {
      // A few keys under the prefix (the usual refinement tile): one Philox call for each
      // of them instead of the whole tile's words.
      for (int64_t k = 0; matches != 0 && k < n; ++k) {
        if ((keys[k] >> 16) != want) continue;
        --matches;
        const uint64_t e = static_cast<uint64_t>(d.offset + i + k);
        if (keys[k] >= 0x7F800000u || retention_word(e, d.seed, d.name_hash, d.patch_id) < d.keep) {
          hist[keys[k] & 0xFFFFu] += 1;
        }
      }
    } else if (digit == 0 || want == 0 || matches) {
      philox_words_lanes<kDrawLanes>(tile0 >> 2, d.seed, d.name_hash, d.patch_id, words);
      const uint32_t* __restrict__ w = words + sh;
      for (int64_t k = 0; k < n; ++k) {
        const uint32_t kept = static_cast<uint32_t>(w[k] < d.keep) |
                              static_cast<uint32_t>(keys[k] >= 0x7F800000u);
        keys[k] &= 0u - kept;
      }
      if (direct) {
        for (int64_t k = 0; k < n; ++k) hist[keys[k] >> 16] += 1;
      } else if (digit == 0) {
        if (pending + n >= (int64_t(1) << 31)) flush();
        for (int64_t k = 0; k < n; ++k) h[(k & 3) * kNumBins + (keys[k] >> 16)] += 1;
        pending += n;
      } else {
        for (int64_t k = 0; k < n; ++k) {
          if ((keys[k] >> 16) == want) hist[keys[k] & 0xFFFFu] += 1;
        }
      }
    }
    i = end;
  }
  if (digit == 0 && !direct) flush();
}

}  // namespace

at::Tensor radix_histogram(const at::Tensor& scores, int64_t prefix, int64_t digit,
                           int64_t keep_threshold, int64_t seed, int64_t name_hash,
                           int64_t patch_id, int64_t offset) {
  check_histogram_args(scores, prefix, digit, keep_threshold, name_hash, patch_id, offset);
  at::Tensor out = at::zeros({kNumBins}, scores.options().dtype(at::kLong));
  const int64_t n = scores.numel();
  int64_t* hist = out.data_ptr<int64_t>();
  const int64_t workers =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kMinPerWorker));
  const bool draw = keep_threshold < kKeepAll;
  const Draw d{offset, static_cast<uint32_t>(keep_threshold & 0xFFFFFFFF),
               static_cast<uint32_t>(static_cast<uint64_t>(seed)), static_cast<uint32_t>(name_hash),
               static_cast<uint32_t>(patch_id)};
  dispatch_float(scores.scalar_type(), "scores", [&](auto tag) {
    using T = decltype(tag);
    const auto* s = static_cast<const typename T::raw*>(scores.data_ptr());
    auto slice = [&](int64_t lo, int64_t hi, int64_t* h) {
      if (draw) {
        count_slice_retained<T>(s, lo, hi, prefix, digit, d, h);
      } else {
        count_slice<T>(s, lo, hi, prefix, digit, h);
      }
    };
    if (workers == 1) {
      slice(0, n, hist);
      return;
    }
    std::vector<int64_t> local(static_cast<size_t>(workers * kNumBins), 0);
    const int64_t per = (n + workers - 1) / workers;
    at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
      for (int64_t w = w0; w < w1; ++w) {
        slice(w * per, std::min(n, (w + 1) * per), local.data() + w * kNumBins);
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
