// CUDA implementations of the safepatch ops (compiled only where a CUDA toolkit exists).
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(safepatch, CUDA, m) {
  m.impl("saliency_accumulate_", &safepatch::cuda::saliency_accumulate_);
  m.impl("radix_histogram", &safepatch::cuda::radix_histogram);
  m.impl("masked_merge", &safepatch::cuda::masked_merge);
}
