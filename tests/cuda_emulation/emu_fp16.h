// cuda_fp16.h stand-ins for the host emulation (c10::Half rounds to nearest even, like
// __float2half_rn).
#pragma once
#include <c10/util/Half.h>
struct emu_half { unsigned short x; };
inline float __half2float(emu_half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }
inline emu_half __ushort_as_half(unsigned short b) { return emu_half{b}; }
inline emu_half __float2half_rn(float f) { return emu_half{c10::Half(f).x}; }
inline unsigned short __half_as_ushort(emu_half h) { return h.x; }
