// CPU kernels of the safepatch ops (schemas in ops.cpp; semantics in docs/design.md §2 and
// safepatch_merge/ops/reference.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace safepatch {
namespace cpu {

at::Tensor& saliency_accumulate_(at::Tensor& score, const at::Tensor& weight,
                                 const at::Tensor& grad, double scale);

// keep_threshold < 2^32: histogram of the retained scores (a dropped element counts as key 0
// unless its key is invalid, >= 0x7F800000); seed, name_hash, patch_id and offset pick the
// retention words as in masked_merge.
at::Tensor radix_histogram(const at::Tensor& scores, int64_t prefix, int64_t digit,
                           int64_t keep_threshold, int64_t seed, int64_t name_hash,
                           int64_t patch_id, int64_t offset);

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_merge(
    const at::Tensor& base, const c10::optional<at::Tensor>& patch_se,
    const c10::optional<at::Tensor>& patch_osm, const c10::optional<at::Tensor>& score_se,
    const c10::optional<at::Tensor>& score_osm, int64_t key_se, int64_t key_osm, int64_t mode,
    double c_se, double c_osm, int64_t keep_threshold, int64_t seed, int64_t name_hash,
    int64_t offset, bool deltas, c10::ScalarType out_dtype, bool return_masks, bool retain_first,
    const c10::optional<at::Tensor>& applied_counts);

at::Tensor philox_words(int64_t offset, int64_t numel, int64_t seed, int64_t name_hash,
                        int64_t patch_id);

}  // namespace cpu
}  // namespace safepatch
