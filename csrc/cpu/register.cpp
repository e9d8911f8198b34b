// CPU kernels of the safepatch ops.
#include "../kernels.h"

SAFEPATCH_REGISTER_KERNELS(CPU, cpu)

// The classic merges' kernels exist for CPU tensors only (other devices: torch.compile).
TORCH_LIBRARY_IMPL(safepatch, CPU, m) {
  m.impl("abs_delta", &safepatch::cpu::abs_delta);
  m.impl("abs_delta_histogram", &safepatch::cpu::abs_delta_histogram);
  m.impl("classic_merge", &safepatch::cpu::classic_merge);
}
