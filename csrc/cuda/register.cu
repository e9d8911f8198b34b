// CUDA kernels of the safepatch ops (compiled only where a CUDA toolkit exists).
#include "../kernels.h"

SAFEPATCH_REGISTER_KERNELS(CUDA, cuda)
