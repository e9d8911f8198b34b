// Schemas of the safepatch ops (docs/design.md §2); kernels register per dispatch key in
// cpu/register.cpp (CPU) and cuda/*.cu (CUDA, compiled only where a CUDA toolkit exists).
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(safepatch, m) {
  m.def("saliency_accumulate_(Tensor(a!) score, Tensor weight, Tensor grad, float scale) -> Tensor(a!)");
  // The trailing defaulted arguments (retention before selection, applied counts) leave the
  // original calls valid: keep_threshold = 2^32 is the plain histogram, retain_first = false
  // the merge with retention after selection.
  m.def(
      "radix_histogram(Tensor scores, int prefix, int digit, int keep_threshold=4294967296, "
      "int seed=0, int name_hash=0, int patch_id=0, int offset=0) -> Tensor");
  m.def(
      "masked_merge(Tensor base, Tensor? patch_se, Tensor? patch_osm, Tensor? score_se, "
      "Tensor? score_osm, int key_se, int key_osm, int mode, float c_se, float c_osm, "
      "int keep_threshold, int seed, int name_hash, int offset, bool deltas, "
      "ScalarType out_dtype, bool return_masks, bool retain_first=False, "
      "Tensor(a!)? applied_counts=None) -> (Tensor, Tensor, Tensor)");
  // No tensor inputs, so no dispatch key to pick a kernel by: defined with its (CPU) function
  // directly, as a catch-all.
  m.def("philox_words(int offset, int numel, int seed, int name_hash, int patch_id) -> Tensor",
        &safepatch::cpu::philox_words);
}
