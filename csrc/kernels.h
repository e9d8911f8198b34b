// Kernels of the safepatch ops, declared once for both devices: namespace safepatch::cpu
// (cpu/*.cpp) and safepatch::cuda (cuda/*.cu, compiled only where a CUDA toolkit exists).
// The schemas are defined in Python (safepatch_merge/ops/library.py), the semantics in
// docs/design.md §2 and safepatch_merge/ops/reference.py; SAFEPATCH_REGISTER_KERNELS binds one
// namespace's kernels to one dispatch key.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#define SAFEPATCH_DECLARE_OP_KERNELS                                                            \
  /* score += scale * weight * grad, in place */                                                \
  void saliency_accumulate_(at::Tensor& score, const at::Tensor& weight, const at::Tensor& grad, \
                            double scale);                                                      \
  /* keep_threshold < 2^32: histogram of the retained scores (a dropped element counts as key  \
     0 unless its key is invalid, >= 0x7F800000); seed, name_hash, patch_id and offset pick the \
     retention words as in masked_merge. */                                                     \
  at::Tensor radix_histogram(const at::Tensor& scores, int64_t prefix, int64_t digit,           \
                             int64_t keep_threshold, int64_t seed, int64_t name_hash,           \
                             int64_t patch_id, int64_t offset);                                 \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_merge(                                  \
      const at::Tensor& base, const c10::optional<at::Tensor>& patch_se,                        \
      const c10::optional<at::Tensor>& patch_osm, const c10::optional<at::Tensor>& score_se,    \
      const c10::optional<at::Tensor>& score_osm, int64_t key_se, int64_t key_osm, int64_t mode, \
      double c_se, double c_osm, int64_t keep_threshold, int64_t seed, int64_t name_hash,       \
      int64_t offset, bool deltas, c10::ScalarType out_dtype, bool return_masks,                \
      bool retain_first, const c10::optional<at::Tensor>& applied_counts);

namespace safepatch {
namespace cpu {
SAFEPATCH_DECLARE_OP_KERNELS

// The retention words of elements offset .. offset+numel-1 (no tensor input: registered for
// CompositeExplicitAutograd, which serves calls without a dispatch key).
at::Tensor philox_words(int64_t offset, int64_t numel, int64_t seed, int64_t name_hash,
                        int64_t patch_id);

// The classic merges (cpu/classic.cpp; CPU only). abs_delta: float32 (numel,)
// |float32(x) - float32(base)|. abs_delta_histogram: radix_histogram's int64 (65536,) counts
// of one digit of abs_delta's keys, without writing |d|. classic_merge: one chunk of
// combine_deltas (safepatch_merge/merge/classic/combine.py), flat, in out_dtype; a trim term
// keeps |d| >= threshold before its cutoff index and |d| > threshold from it on.
at::Tensor abs_delta(const at::Tensor& x, const at::Tensor& base);
at::Tensor abs_delta_histogram(const at::Tensor& x, const at::Tensor& base, int64_t prefix,
                               int64_t digit);
at::Tensor classic_merge(const at::Tensor& base, at::TensorList xs, at::IntArrayRef kinds,
                         at::ArrayRef<double> thresholds, at::IntArrayRef cutoffs,
                         at::ArrayRef<double> factors,
                         at::ArrayRef<double> weights, at::TensorList masks, bool consensus,
                         bool normalize, double lin_div, double lam, c10::ScalarType out_dtype);
}  // namespace cpu

namespace cuda {
SAFEPATCH_DECLARE_OP_KERNELS
}  // namespace cuda
}  // namespace safepatch

#define SAFEPATCH_REGISTER_KERNELS(KEY, NS)                              \
  TORCH_LIBRARY_IMPL(safepatch, KEY, m) {                                \
    m.impl("saliency_accumulate_", &safepatch::NS::saliency_accumulate_); \
    m.impl("radix_histogram", &safepatch::NS::radix_histogram);          \
    m.impl("masked_merge", &safepatch::NS::masked_merge);                \
  }
