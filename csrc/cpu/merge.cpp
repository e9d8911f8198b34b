// SafePatching's masked merge of one tensor or chunk, in one pass (docs/design.md §1.5–§1.7, §2):
//   in_X      = key(S_X) >= key_X && key(S_X) > 0       (patch absent -> false; mode none -> true)
//   M_X       = by mode from in_SE, in_OSM
//   applied_X = M_X && philox word < keep_threshold
// Retention before selection (retain_first, modes other than none, p < 1): the retention test
// moves into in_X (in_X = selected && kept) and applied_X = M_X.
//   acc = float(base); acc += c_se * d_se if applied_se; acc += c_osm * d_osm if applied_osm
//   out = acc rounded (nearest even) to out_dtype
// Work goes in tiles of kTile elements aligned to absolute element indices (offset + i), so a
// tile's Philox blocks are whole: one Philox call per four elements, shared by every chunking.
// Common case (both patches, mode difference / intersection / topk, one dtype for base, patches
// and out, one for both scores): fused_tile, two vectorised passes per tile. Anything else:
// the generic path, which converts each input to fp32 / key buffers first (one small loop per
// input and dtype) and combines them in branch-free loops. Both round exactly alike.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "../op_checks.h"
#include "../philox.h"
#include "convert.h"
#include "hugepages.h"
#include "../kernels.h"
#include "philox_lanes.h"

namespace safepatch {
namespace cpu {
namespace {

constexpr int kLanes = 128;              // Philox blocks per tile
constexpr int64_t kTile = 4 * kLanes;    // elements per tile
constexpr int64_t kGrain = 64 * kTile;   // elements per parallel work item (at least)
// Software prefetch distance and locality (compile-time knobs for tuning on other CPUs).
#ifndef SAFEPATCH_PREFETCH_TILES
#define SAFEPATCH_PREFETCH_TILES 2
#endif
#ifndef SAFEPATCH_PREFETCH_LOCALITY
#define SAFEPATCH_PREFETCH_LOCALITY 0
#endif
constexpr int64_t kPrefetchTiles = SAFEPATCH_PREFETCH_TILES;  // how far ahead, in tiles

using LoadFn = void (*)(const void*, int64_t, float*);
using KeyFn = void (*)(const void*, int64_t, uint32_t, uint32_t*);
using StoreFn = void (*)(const float*, int64_t, void*);

template <typename T>
void load_f32(const void* src, int64_t n, float* __restrict__ dst) {
  const auto* s = static_cast<const typename T::raw*>(src);
  for (int64_t k = 0; k < n; ++k) dst[k] = T::load(s[k]);
}

// sel[k] = 1 iff key(s[k]) >= key_t and key(s[k]) > 0 (-0 has key 0).
template <typename T>
void select_keys(const void* src, int64_t n, uint32_t key_t, uint32_t* __restrict__ sel) {
  const auto* s = static_cast<const typename T::raw*>(src);
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t key = score_key_from_bits(T::key_bits(s[k]));
    sel[k] = static_cast<uint32_t>(key >= key_t) & static_cast<uint32_t>(key > 0);
  }
}

template <typename T>
void store_f32(const float* __restrict__ src, int64_t n, void* dst) {
  auto* d = static_cast<typename T::raw*>(dst);
  for (int64_t k = 0; k < n; ++k) d[k] = T::store(src[k]);
}

LoadFn load_fn(c10::ScalarType t) {
  return dispatch_float(t, "input", [](auto tag) -> LoadFn { return &load_f32<decltype(tag)>; });
}
KeyFn key_fn(c10::ScalarType t) {
  return dispatch_float(t, "score", [](auto tag) -> KeyFn { return &select_keys<decltype(tag)>; });
}
StoreFn store_fn(c10::ScalarType t) {
  return dispatch_float(t, "out_dtype", [](auto tag) -> StoreFn { return &store_f32<decltype(tag)>; });
}

struct Patch {
  bool present = false;
  const char* data = nullptr;  // patch values
  const char* score = nullptr; // saliency (nullptr in mode none)
  int64_t esize = 0, score_esize = 0;
  LoadFn load = nullptr;
  KeyFn keys = nullptr;
  uint32_t key_t = 0;
  float coeff = 0.f;
  uint32_t patch_id = 0;
  bool draw = false;  // keep_threshold < 2^32: retention words needed
  bool* mask_out = nullptr;
};

struct Tile {
  alignas(64) float base[kTile];
  alignas(64) float delta[2][kTile];
  alignas(64) uint32_t in[2][kTile];
  alignas(64) uint32_t applied[2][kTile];
  alignas(64) uint32_t words[kTile];
  alignas(64) float acc[kTile];
  alignas(64) uint32_t keep_words[2][kTile];  // fused path; stay 0 (= kept) when p == 1
  int64_t counted[2] = {0, 0};                // applied elements of this worker, per patch
};

struct Merge;
using FusedFn = void (*)(const Merge&, Tile&, int64_t, int64_t);

struct Merge {
  const char* base;
  int64_t base_esize;
  LoadFn load_base;
  char* out;
  int64_t out_esize;
  StoreFn store;
  Patch x[2];
  int64_t mode;
  bool deltas;
  uint32_t seed, name_hash, keep;
  int64_t offset;
  bool retain_first = false;  // retention folded into in_X (before selection)
  bool count = false;         // add applied elements into Tile::counted
  FusedFn fused = nullptr;  // single-pass kernel for the common dtype combinations

  // Asks for the inputs of elements j .. j+n-1 ahead of use: six concurrent streams per
  // thread are more than the hardware prefetchers keep far enough ahead.
  void prefetch(int64_t j, int64_t n) const {
    auto lines = [&](const char* p, int64_t esize) {
      if (p == nullptr) return;
      const char* a = p + j * esize;
      for (int64_t o = 0; o < n * esize; o += 64) __builtin_prefetch(a + o, 0, SAFEPATCH_PREFETCH_LOCALITY);
    };
    lines(base, base_esize);
    for (int p = 0; p < 2; ++p) {
      if (!x[p].present) continue;
      lines(x[p].data, x[p].esize);
      lines(x[p].score, x[p].score_esize);
    }
  }

  // Elements j .. j+n-1 of the chunk (absolute indices offset+j ..), inside one aligned tile.
  void tile(Tile& t, int64_t j, int64_t n) const {
    if (fused != nullptr) {
      fused(*this, t, j, n);
      return;
    }
    const uint64_t a0 = static_cast<uint64_t>(offset + j);
    const uint64_t tile0 = a0 / kTile * kTile;
    const int64_t sh = static_cast<int64_t>(a0 - tile0);

    for (int p = 0; p < 2; ++p) {
      const Patch& q = x[p];
      uint32_t* in = t.in[p];
      if (!q.present) {
        std::memset(in, 0, sizeof(uint32_t) * n);
      } else if (mode == kNone) {
        for (int64_t k = 0; k < n; ++k) in[k] = 1;
      } else {
        q.keys(q.score + j * q.score_esize, n, q.key_t, in);
        if (retain_first) {  // T_X = selected and kept (q.draw holds: retain_first needs p < 1)
          uint32_t any = 0;
          for (int64_t k = 0; k < n; ++k) any |= in[k];
          if (any) {
            philox_words_lanes<kLanes>(tile0 >> 2, seed, name_hash, q.patch_id, t.words);
            const uint32_t* __restrict__ w = t.words + sh;
            const uint32_t thr = keep;
            for (int64_t k = 0; k < n; ++k) in[k] &= static_cast<uint32_t>(w[k] < thr);
          }
        }
      }
    }
    // M_X by mode, written into applied[X]; retention (after selection) is and-ed in below.
    uint32_t* __restrict__ m0 = t.applied[0];
    uint32_t* __restrict__ m1 = t.applied[1];
    const uint32_t* __restrict__ i0 = t.in[0];
    const uint32_t* __restrict__ i1 = t.in[1];
    if (mode == kDifference) {
      for (int64_t k = 0; k < n; ++k) {
        m0[k] = i0[k] & (i1[k] ^ 1u);
        m1[k] = i1[k] & (i0[k] ^ 1u);
      }
    } else if (mode == kIntersection) {
      for (int64_t k = 0; k < n; ++k) m0[k] = m1[k] = i0[k] & i1[k];
    } else {
      std::memcpy(m0, i0, sizeof(uint32_t) * n);
      std::memcpy(m1, i1, sizeof(uint32_t) * n);
    }

    load_base(base + j * base_esize, n, t.base);
    float* __restrict__ acc = t.acc;
    const float* __restrict__ b = t.base;
    std::memcpy(acc, b, sizeof(float) * n);
    for (int p = 0; p < 2; ++p) {
      const Patch& q = x[p];
      if (!q.present) continue;
      uint32_t* __restrict__ m = t.applied[p];
      uint32_t any = 0;
      for (int64_t k = 0; k < n; ++k) any |= m[k];
      if (!any) continue;  // nothing selected here: no draw, no patch read
      if (q.draw && !retain_first) {
        philox_words_lanes<kLanes>(tile0 >> 2, seed, name_hash, q.patch_id, t.words);
        const uint32_t* __restrict__ w = t.words + sh;
        const uint32_t thr = keep;
        for (int64_t k = 0; k < n; ++k) m[k] &= static_cast<uint32_t>(w[k] < thr);
      }
      if (count) {
        uint32_t c = 0;
        for (int64_t k = 0; k < n; ++k) c += m[k];
        t.counted[p] += c;
      }
      float* __restrict__ d = t.delta[p];
      q.load(q.data + j * q.esize, n, d);
      if (!deltas) {
        for (int64_t k = 0; k < n; ++k) d[k] = d[k] - b[k];
      }
      const float c = q.coeff;
      for (int64_t k = 0; k < n; ++k) {
        const float v = acc[k] + c * d[k];
        acc[k] = m[k] ? v : acc[k];
      }
    }
    store(acc, n, out + j * out_esize);
    for (int p = 0; p < 2; ++p) {
      bool* mo = x[p].mask_out;
      if (mo == nullptr) continue;
      if (!x[p].present) {
        std::memset(mo + j, 0, n);
        continue;
      }
      const uint32_t* __restrict__ m = t.applied[p];
      for (int64_t k = 0; k < n; ++k) mo[j + k] = m[k] != 0;
    }
  }
};


// The fused tiles' outputs besides the merged values: the applied masks (when asked for) and
// this worker's applied counts (when counting); t.applied holds the final masks.
inline void fused_outputs(const Merge& mg, Tile& t, int64_t j, int64_t n) {
  for (int p = 0; p < 2; ++p) {
    const uint32_t* __restrict__ m = t.applied[p];
    bool* mo = mg.x[p].mask_out;
    if (mo != nullptr) {
      for (int64_t k = 0; k < n; ++k) mo[j + k] = m[k] != 0;
    }
    if (mg.count) {
      uint32_t c = 0;
      for (int64_t k = 0; k < n; ++k) c += m[k];
      t.counted[p] += c;
    }
  }
}

// Single-pass tile for the common case: both patches present, scores used (mode difference,
// intersection or topk), base / patches / out of one dtype V, both scores of one dtype S.
// Pass 1 turns the scores into M_SE, M_OSM; Philox then fills the retention words of the tile's
// blocks (only for a patch with something selected); pass 2 reads base and patches once,
// computes in fp32 and writes the output. Same arithmetic as the generic path, bit for bit.
template <typename V, typename S, bool Deltas>
void fused_tile(const Merge& mg, Tile& t, int64_t j, int64_t n) {
  const uint64_t a0 = static_cast<uint64_t>(mg.offset + j);
  const uint64_t tile0 = a0 / kTile * kTile;
  const int64_t sh = static_cast<int64_t>(a0 - tile0);
  const auto* __restrict__ s0 = reinterpret_cast<const typename S::raw*>(mg.x[0].score) + j;
  const auto* __restrict__ s1 = reinterpret_cast<const typename S::raw*>(mg.x[1].score) + j;
  uint32_t* __restrict__ m0 = t.applied[0];
  uint32_t* __restrict__ m1 = t.applied[1];
  const uint32_t t0 = mg.x[0].key_t, t1 = mg.x[1].key_t;
  uint32_t any0 = 0, any1 = 0;
  switch (mg.mode) {
    case kDifference:
      for (int64_t k = 0; k < n; ++k) {
        const uint32_t k0 = score_key_from_bits(S::key_bits(s0[k]));
        const uint32_t k1 = score_key_from_bits(S::key_bits(s1[k]));
        const uint32_t i0 = static_cast<uint32_t>(k0 >= t0) & static_cast<uint32_t>(k0 > 0);
        const uint32_t i1 = static_cast<uint32_t>(k1 >= t1) & static_cast<uint32_t>(k1 > 0);
        const uint32_t a0 = i0 & ~i1;
        const uint32_t a1 = i1 & ~i0;
        m0[k] = a0;
        m1[k] = a1;
        any0 |= a0;
        any1 |= a1;
      }
      break;
    case kIntersection:
      for (int64_t k = 0; k < n; ++k) {
        const uint32_t k0 = score_key_from_bits(S::key_bits(s0[k]));
        const uint32_t k1 = score_key_from_bits(S::key_bits(s1[k]));
        const uint32_t i0 = static_cast<uint32_t>(k0 >= t0) & static_cast<uint32_t>(k0 > 0);
        const uint32_t i1 = static_cast<uint32_t>(k1 >= t1) & static_cast<uint32_t>(k1 > 0);
        const uint32_t a = i0 & i1;
        m0[k] = a;
        any0 |= a;
      }
      std::memcpy(m1, m0, sizeof(uint32_t) * n);
      any1 = any0;
      break;
    default:  // topk
      for (int64_t k = 0; k < n; ++k) {
        const uint32_t k0 = score_key_from_bits(S::key_bits(s0[k]));
        const uint32_t k1 = score_key_from_bits(S::key_bits(s1[k]));
        const uint32_t a0 = static_cast<uint32_t>(k0 >= t0) & static_cast<uint32_t>(k0 > 0);
        const uint32_t a1 = static_cast<uint32_t>(k1 >= t1) & static_cast<uint32_t>(k1 > 0);
        m0[k] = a0;
        m1[k] = a1;
        any0 |= a0;
        any1 |= a1;
      }
  }
  const bool draw = mg.x[0].draw;  // the same for both patches (p is shared)
  if (draw && any0) philox_words_lanes<kLanes>(tile0 >> 2, mg.seed, mg.name_hash, 0, t.keep_words[0]);
  if (draw && any1) philox_words_lanes<kLanes>(tile0 >> 2, mg.seed, mg.name_hash, 1, t.keep_words[1]);
  const uint32_t thr = draw ? mg.keep : 1u;  // words stay 0 without drawing: 0 < 1 keeps
  const uint32_t* __restrict__ w0 = t.keep_words[0] + sh;
  const uint32_t* __restrict__ w1 = t.keep_words[1] + sh;
  const auto* __restrict__ b = reinterpret_cast<const typename V::raw*>(mg.base) + j;
  const auto* __restrict__ p0 = reinterpret_cast<const typename V::raw*>(mg.x[0].data) + j;
  const auto* __restrict__ p1 = reinterpret_cast<const typename V::raw*>(mg.x[1].data) + j;
  auto* __restrict__ o = reinterpret_cast<typename V::raw*>(mg.out) + j;
  const float c0 = mg.x[0].coeff, c1 = mg.x[1].coeff;
  for (int64_t k = 0; k < n; ++k) {
    const float bv = V::load(b[k]);
    float d0 = V::load(p0[k]);
    float d1 = V::load(p1[k]);
    if (!Deltas) {
      d0 = d0 - bv;
      d1 = d1 - bv;
    }
    const uint32_t a0k = m0[k] & static_cast<uint32_t>(w0[k] < thr);
    const uint32_t a1k = m1[k] & static_cast<uint32_t>(w1[k] < thr);
    m0[k] = a0k;
    m1[k] = a1k;
    float acc = bv;
    const float v0 = acc + c0 * d0;
    acc = a0k ? v0 : acc;
    const float v1 = acc + c1 * d1;
    acc = a1k ? v1 : acc;
    o[k] = V::store(acc);
  }
  fused_outputs(mg, t, j, n);
}

// The fused tile with retention before selection (p < 1): pass 1 selects by score; Philox
// fills the retention words of each patch with something selected; T_X = selected and kept
// goes through the mode; pass 2 applies M_X without drawing. Same arithmetic as fused_tile.
template <typename V, typename S, bool Deltas>
void fused_tile_retain_first(const Merge& mg, Tile& t, int64_t j, int64_t n) {
  const uint64_t a0 = static_cast<uint64_t>(mg.offset + j);
  const uint64_t tile0 = a0 / kTile * kTile;
  const int64_t sh = static_cast<int64_t>(a0 - tile0);
  const auto* __restrict__ s0 = reinterpret_cast<const typename S::raw*>(mg.x[0].score) + j;
  const auto* __restrict__ s1 = reinterpret_cast<const typename S::raw*>(mg.x[1].score) + j;
  uint32_t* __restrict__ m0 = t.applied[0];
  uint32_t* __restrict__ m1 = t.applied[1];
  const uint32_t t0 = mg.x[0].key_t, t1 = mg.x[1].key_t;
  uint32_t any0 = 0, any1 = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t k0 = score_key_from_bits(S::key_bits(s0[k]));
    const uint32_t k1 = score_key_from_bits(S::key_bits(s1[k]));
    const uint32_t i0 = static_cast<uint32_t>(k0 >= t0) & static_cast<uint32_t>(k0 > 0);
    const uint32_t i1 = static_cast<uint32_t>(k1 >= t1) & static_cast<uint32_t>(k1 > 0);
    m0[k] = i0;
    m1[k] = i1;
    any0 |= i0;
    any1 |= i1;
  }
  // Words of a patch with nothing selected here are stale, and-ed with zeros only.
  if (any0) philox_words_lanes<kLanes>(tile0 >> 2, mg.seed, mg.name_hash, 0, t.keep_words[0]);
  if (any1) philox_words_lanes<kLanes>(tile0 >> 2, mg.seed, mg.name_hash, 1, t.keep_words[1]);
  const uint32_t thr = mg.keep;
  const uint32_t* __restrict__ w0 = t.keep_words[0] + sh;
  const uint32_t* __restrict__ w1 = t.keep_words[1] + sh;
  switch (mg.mode) {
    case kDifference:
      for (int64_t k = 0; k < n; ++k) {
        const uint32_t r0 = m0[k] & static_cast<uint32_t>(w0[k] < thr);
        const uint32_t r1 = m1[k] & static_cast<uint32_t>(w1[k] < thr);
        m0[k] = r0 & ~r1;
        m1[k] = r1 & ~r0;
      }
      break;
    case kIntersection:
      for (int64_t k = 0; k < n; ++k) {
        const uint32_t r0 = m0[k] & static_cast<uint32_t>(w0[k] < thr);
        const uint32_t r1 = m1[k] & static_cast<uint32_t>(w1[k] < thr);
        m0[k] = m1[k] = r0 & r1;
      }
      break;
    default:  // topk
      for (int64_t k = 0; k < n; ++k) {
        m0[k] &= static_cast<uint32_t>(w0[k] < thr);
        m1[k] &= static_cast<uint32_t>(w1[k] < thr);
      }
  }
  const auto* __restrict__ b = reinterpret_cast<const typename V::raw*>(mg.base) + j;
  const auto* __restrict__ p0 = reinterpret_cast<const typename V::raw*>(mg.x[0].data) + j;
  const auto* __restrict__ p1 = reinterpret_cast<const typename V::raw*>(mg.x[1].data) + j;
  auto* __restrict__ o = reinterpret_cast<typename V::raw*>(mg.out) + j;
  const float c0 = mg.x[0].coeff, c1 = mg.x[1].coeff;
  for (int64_t k = 0; k < n; ++k) {
    const float bv = V::load(b[k]);
    float d0 = V::load(p0[k]);
    float d1 = V::load(p1[k]);
    if (!Deltas) {
      d0 = d0 - bv;
      d1 = d1 - bv;
    }
    float acc = bv;
    const float v0 = acc + c0 * d0;
    acc = m0[k] ? v0 : acc;
    const float v1 = acc + c1 * d1;
    acc = m1[k] ? v1 : acc;
    o[k] = V::store(acc);
  }
  fused_outputs(mg, t, j, n);
}

template <typename V, typename S>
FusedFn fused_for(bool deltas, bool retain_first) {
  if (retain_first) {
    return deltas ? &fused_tile_retain_first<V, S, true> : &fused_tile_retain_first<V, S, false>;
  }
  return deltas ? &fused_tile<V, S, true> : &fused_tile<V, S, false>;
}

template <typename V>
FusedFn fused_for_scores(c10::ScalarType score, bool deltas, bool retain_first) {
  return dispatch_float(score, "score",
                        [&](auto st) { return fused_for<V, decltype(st)>(deltas, retain_first); });
}

// The fused kernel for these inputs, or nullptr when only the generic path handles them.
FusedFn choose_fused(const at::Tensor& base, const c10::optional<at::Tensor>& patch_se,
                     const c10::optional<at::Tensor>& patch_osm,
                     const c10::optional<at::Tensor>& score_se,
                     const c10::optional<at::Tensor>& score_osm, int64_t mode, bool deltas,
                     c10::ScalarType out_dtype, bool retain_first) {
  if (mode == kNone || !patch_se.has_value() || !patch_osm.has_value()) return nullptr;
  const c10::ScalarType v = base.scalar_type();
  if (patch_se->scalar_type() != v || patch_osm->scalar_type() != v || out_dtype != v) return nullptr;
  if (score_se->scalar_type() != score_osm->scalar_type()) return nullptr;
  return dispatch_float(v, "base", [&](auto vt) {
    return fused_for_scores<decltype(vt)>(score_se->scalar_type(), deltas, retain_first);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_merge(
    const at::Tensor& base, const c10::optional<at::Tensor>& patch_se,
    const c10::optional<at::Tensor>& patch_osm, const c10::optional<at::Tensor>& score_se,
    const c10::optional<at::Tensor>& score_osm, int64_t key_se, int64_t key_osm, int64_t mode,
    double c_se, double c_osm, int64_t keep_threshold, int64_t seed, int64_t name_hash,
    int64_t offset, bool deltas, c10::ScalarType out_dtype, bool return_masks, bool retain_first,
    const c10::optional<at::Tensor>& applied_counts) {
  check_merge_args(base, patch_se, patch_osm, score_se, score_osm, key_se, key_osm, mode,
                   keep_threshold, name_hash, offset, out_dtype);
  check_counts_arg(applied_counts, base);
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_dtype));
  at::Tensor mask_se, mask_osm;
  if (return_masks) {
    mask_se = at::empty(base.sizes(), base.options().dtype(at::kBool));
    mask_osm = at::empty(base.sizes(), base.options().dtype(at::kBool));
  } else {
    mask_se = at::empty({0}, base.options().dtype(at::kBool));
    mask_osm = at::empty({0}, base.options().dtype(at::kBool));
  }
  const int64_t n = base.numel();
  if (n == 0) return {out, mask_se, mask_osm};
  advise_huge_pages(out.data_ptr(), static_cast<size_t>(out.nbytes()));
  if (return_masks) {
    advise_huge_pages(mask_se.data_ptr(), static_cast<size_t>(mask_se.nbytes()));
    advise_huge_pages(mask_osm.data_ptr(), static_cast<size_t>(mask_osm.nbytes()));
  }

  Merge mg;
  mg.base = static_cast<const char*>(base.data_ptr());
  mg.base_esize = base.element_size();
  mg.load_base = load_fn(base.scalar_type());
  mg.out = static_cast<char*>(out.data_ptr());
  mg.out_esize = out.element_size();
  mg.store = store_fn(out_dtype);
  mg.mode = mode;
  mg.deltas = deltas;
  mg.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  mg.name_hash = static_cast<uint32_t>(name_hash);
  const bool keep_all = keep_threshold >= kKeepAll;
  mg.keep = keep_all ? 0u : static_cast<uint32_t>(keep_threshold);
  mg.offset = offset;
  // Mode none selects nothing to fold retention into, and p == 1 draws nothing: both are the
  // retention-after-selection merge.
  mg.retain_first = retain_first && mode != kNone && !keep_all;
  mg.count = applied_counts.has_value();
  const c10::optional<at::Tensor>* patches[2] = {&patch_se, &patch_osm};
  const c10::optional<at::Tensor>* scores[2] = {&score_se, &score_osm};
  const int64_t keys[2] = {key_se, key_osm};
  const double coeffs[2] = {c_se, c_osm};
  at::Tensor* masks[2] = {&mask_se, &mask_osm};
  for (int p = 0; p < 2; ++p) {
    Patch& q = mg.x[p];
    q.patch_id = static_cast<uint32_t>(p);
    q.mask_out = return_masks ? masks[p]->data_ptr<bool>() : nullptr;
    if (!patches[p]->has_value()) continue;
    const at::Tensor& pt = **patches[p];
    q.present = true;
    q.data = static_cast<const char*>(pt.data_ptr());
    q.esize = pt.element_size();
    q.load = load_fn(pt.scalar_type());
    q.key_t = static_cast<uint32_t>(keys[p]);
    q.coeff = static_cast<float>(coeffs[p]);  // rounded once, to nearest, like the reference
    q.draw = !keep_all;
    if (mode != kNone) {
      const at::Tensor& st = **scores[p];
      q.score = static_cast<const char*>(st.data_ptr());
      q.score_esize = st.element_size();
      q.keys = key_fn(st.scalar_type());
    }
  }

  mg.fused = choose_fused(base, patch_se, patch_osm, score_se, score_osm, mode, deltas, out_dtype,
                          mg.retain_first);
  std::atomic<int64_t> total[2] = {0, 0};
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    Tile t;
    std::memset(t.keep_words, 0, sizeof(t.keep_words));
    int64_t j = lo;
    while (j < hi) {
      const int64_t a = offset + j;
      const int64_t end = std::min(hi, (a / kTile + 1) * kTile - offset);
      const int64_t ahead = end + kPrefetchTiles * kTile;
      if (ahead < hi) mg.prefetch(ahead, std::min<int64_t>(kTile, hi - ahead));
      mg.tile(t, j, end - j);
      j = end;
    }
    total[0] += t.counted[0];
    total[1] += t.counted[1];
  });
  if (mg.count) {
    int64_t* c = applied_counts->data_ptr<int64_t>();
    c[0] += total[0].load();
    c[1] += total[1].load();
  }
  return {out, mask_se, mask_osm};
}

}  // namespace cpu
}  // namespace safepatch
