// Argument checks of the safepatch ops (host code, shared by the CPU and CUDA registrations).
// The Python layer (safepatch_merge.ops) validates first with friendlier messages; these
// checks keep direct torch.ops.safepatch calls from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>

namespace safepatch {

constexpr int64_t kNumBins = 65536;
constexpr int64_t kInfKey = 0x7F800000;  // key of +inf: a threshold that selects nothing
enum MergeMode : int64_t { kDifference = 0, kIntersection = 1, kTopk = 2, kNone = 3 };

// Integers enter check messages as std::string, never through operator<<(long): on the H200
// machine (gcc 13.3, torch 2.11) an int64 streamed from this extension into c10::str's
// ostringstream crashed the process with SIGSEGV instead of raising, while strings and
// Devices streamed fine (bench/op_check_probe.py reproduces it, one process per call).
inline std::string num(int64_t v) { return std::to_string(v); }

inline bool is_float_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 ||
         t == c10::ScalarType::Half;
}

inline void check_dense(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(t.layout() == c10::kStrided, op, ": ", what, " has unsupported layout ", t.layout(),
              "; only dense (strided) tensors");
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", what, " has dtype ", t.scalar_type(),
              "; supported: float32, bfloat16, float16");
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* what, const char* ref_what) {
  TORCH_CHECK(t.numel() == ref.numel(), op, ": ", what, " has ", num(t.numel()), " elements but ",
              ref_what, " has ", num(ref.numel()));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", what, " is on ", t.device(), " but ",
              ref_what, " is on ", ref.device());
}

inline void check_saliency_args(const at::Tensor& score, const at::Tensor& weight,
                                const at::Tensor& grad) {
  const char* op = "safepatch::saliency_accumulate_";
  check_dense(score, op, "score");
  TORCH_CHECK(score.scalar_type() == c10::ScalarType::Float, op, ": score must be float32, got ",
              score.scalar_type());
  check_dense(weight, op, "weight");
  check_dense(grad, op, "grad");
  check_like(weight, score, op, "weight", "score");
  check_like(grad, score, op, "grad", "score");
}

inline void check_histogram_args(const at::Tensor& scores, int64_t prefix, int64_t digit,
                                 int64_t keep_threshold, int64_t name_hash, int64_t patch_id,
                                 int64_t offset) {
  const char* op = "safepatch::radix_histogram";
  check_dense(scores, op, "scores");
  TORCH_CHECK(digit == 0 || digit == 1, op, ": digit must be 0 or 1, got ", num(digit));
  TORCH_CHECK(digit == 0 || (prefix >= 0 && prefix < kNumBins), op,
              ": prefix must be in [0, 65535] for digit 1, got ", num(prefix));
  TORCH_CHECK(keep_threshold >= 0 && keep_threshold <= (int64_t(1) << 32), op,
              ": keep_threshold must be floor(p * 2^32) with p in [0, 1], got ", num(keep_threshold));
  TORCH_CHECK(name_hash >= 0 && name_hash < (int64_t(1) << 32), op,
              ": name_hash must be a uint32, got ", num(name_hash));
  TORCH_CHECK(patch_id == 0 || patch_id == 1, op, ": patch_id must be 0 (SE) or 1 (OSM), got ",
              num(patch_id));
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", num(offset));
}

// Optional int64 (2,) accumulator of applied-element counts, on base's device.
inline void check_counts_arg(const c10::optional<at::Tensor>& counts, const at::Tensor& base) {
  const char* op = "safepatch::masked_merge";
  if (!counts.has_value()) return;
  const at::Tensor& c = *counts;
  TORCH_CHECK(c.scalar_type() == c10::ScalarType::Long && c.numel() == 2 && c.is_contiguous(), op,
              ": applied_counts must be a contiguous int64 tensor of 2 elements");
  TORCH_CHECK(c.device() == base.device(), op, ": applied_counts is on ", c.device(),
              " but base is on ", base.device());
}

inline void check_merge_args(const at::Tensor& base, const c10::optional<at::Tensor>& patch_se,
                             const c10::optional<at::Tensor>& patch_osm,
                             const c10::optional<at::Tensor>& score_se,
                             const c10::optional<at::Tensor>& score_osm, int64_t key_se,
                             int64_t key_osm, int64_t mode, int64_t keep_threshold,
                             int64_t name_hash, int64_t offset, c10::ScalarType out_dtype) {
  const char* op = "safepatch::masked_merge";
  check_dense(base, op, "base");
  TORCH_CHECK(mode >= kDifference && mode <= kNone, op,
              ": mode must be 0 (difference), 1 (intersection), 2 (topk) or 3 (none), got ", num(mode));
  const c10::optional<at::Tensor>* patches[2] = {&patch_se, &patch_osm};
  const c10::optional<at::Tensor>* scores[2] = {&score_se, &score_osm};
  const char* patch_names[2] = {"patch_se", "patch_osm"};
  const char* score_names[2] = {"score_se", "score_osm"};
  const int64_t keys[2] = {key_se, key_osm};
  const char* key_names[2] = {"key_se", "key_osm"};
  for (int x = 0; x < 2; ++x) {
    TORCH_CHECK(keys[x] >= 0 && keys[x] <= kInfKey, op, ": ", key_names[x],
                " must be the key of a threshold in [0, +inf] (0 .. 0x7F800000), got ", num(keys[x]),
                " (a NaN or negative threshold?)");
    if (!patches[x]->has_value()) continue;
    check_dense(**patches[x], op, patch_names[x]);
    check_like(**patches[x], base, op, patch_names[x], "base");
    if (mode == kNone) continue;
    TORCH_CHECK(scores[x]->has_value(), op, ": ", score_names[x],
                " is required when its patch is given and mode is not none");
    check_dense(**scores[x], op, score_names[x]);
    check_like(**scores[x], base, op, score_names[x], "base");
  }
  TORCH_CHECK(keep_threshold >= 0 && keep_threshold <= (int64_t(1) << 32), op,
              ": keep_threshold must be floor(p * 2^32) with p in [0, 1], got ", num(keep_threshold));
  TORCH_CHECK(name_hash >= 0 && name_hash < (int64_t(1) << 32), op,
              ": name_hash must be a uint32, got ", num(name_hash));
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", num(offset));
  TORCH_CHECK(is_float_dtype(out_dtype), op, ": out_dtype must be float32, bfloat16 or float16, got ",
              out_dtype);
}

}  // namespace safepatch
