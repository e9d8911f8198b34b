// CPU kernels of the safepatch ops.
#include "../kernels.h"

SAFEPATCH_REGISTER_KERNELS(CPU, cpu)
