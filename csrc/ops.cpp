// The safepatch ops' schemas are defined in Python (safepatch_merge/ops/library.py), once for
// every backend, before this extension loads; the extension only adds kernels: per dispatch
// key in cpu/register.cpp and cuda/register.cu, and here the one op without tensor inputs.
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(safepatch, CompositeExplicitAutograd, m) {
  m.impl("philox_words", &safepatch::cpu::philox_words);
}
