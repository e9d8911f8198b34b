// fp32 <-> storage-dtype conversions on raw bits, written so loops over them vectorise
// (no branches, no calls). bf16 and fp16 outputs round to nearest even, NaN -> quiet NaN,
// bit for bit like torch's own .to(dtype).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

namespace safepatch {
namespace cpu {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct F32 {
  using raw = float;
  static inline float load(float v) { return v; }
  static inline float store(float f) { return f; }
  static inline uint32_t key_bits(float v) { return f32_bits(v); }
};

struct BF16 {
  using raw = uint16_t;
  static inline float load(uint16_t v) { return f32_from_bits(static_cast<uint32_t>(v) << 16); }
  static inline uint16_t store(float f) {
    const uint32_t u = f32_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
  static inline uint32_t key_bits(uint16_t v) { return static_cast<uint32_t>(v) << 16; }
};

struct F16 {
  using raw = uint16_t;
  static inline float load(uint16_t v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static inline uint16_t store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
  static inline uint32_t key_bits(uint16_t v) { return f32_bits(load(v)); }
};

// Calls f(Tag{}) with the tag of a float32 / bfloat16 / float16 dtype.
template <typename F>
inline auto dispatch_float(c10::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case c10::ScalarType::Float:
      return f(F32{});
    case c10::ScalarType::BFloat16:
      return f(BF16{});
    case c10::ScalarType::Half:
      return f(F16{});
    default:
      TORCH_CHECK(false, what, " has dtype ", t, "; supported: float32, bfloat16, float16");
  }
  return f(F32{});  // unreachable: TORCH_CHECK(false) throws
}

}  // namespace cpu
}  // namespace safepatch
