// CPU implementations of the safepatch ops.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(safepatch, CPU, m) {
  m.impl("saliency_accumulate_", &safepatch::cpu::saliency_accumulate_);
  m.impl("radix_histogram", &safepatch::cpu::radix_histogram);
  m.impl("masked_merge", &safepatch::cpu::masked_merge);
}
