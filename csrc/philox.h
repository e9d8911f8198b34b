// Philox4x32-10 (Salmon et al. 2011, Random123's philox4x32_R(10, ...)) and the retention
// stream of docs/design.md §1.6, shared by the C++ (CPU) and CUDA sources. Header-only, no torch.
//
//   key     = (seed mod 2^32, FNV-1a-32(tensor name))
//   counter = (low32(i >> 2), high32(i >> 2), patch_id, 0)     i: int64 element index
//   word    = philox4x32_10(counter, key)[i & 3]
//   keep    = word < keep_threshold                            keep_threshold = floor(p * 2^32)
//
// One Philox call yields the words of four consecutive elements: kernels draw once per block
// of four, never once per element.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAFEPATCH_HD __host__ __device__ __forceinline__
#else
#define SAFEPATCH_HD inline
#endif

namespace safepatch {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// keep_threshold value meaning p == 1: every element kept, nothing drawn.
constexpr int64_t kKeepAll = int64_t(1) << 32;

SAFEPATCH_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// In place: (c0, c1, c2, c3) <- philox4x32_10((c0, c1, c2, c3), (k0, k1)).
SAFEPATCH_HD void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c0, hi0, lo0);
    philox_mulhilo(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// The four retention words of block `block` (elements 4*block .. 4*block+3) of a tensor.
SAFEPATCH_HD void retention_block(uint64_t block, uint32_t seed, uint32_t name_hash,
                                  uint32_t patch_id, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = patch_id, c3 = 0;
  philox4x32_10(c0, c1, c2, c3, seed, name_hash);
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The retention word of element index i (slow path: one Philox call per element).
SAFEPATCH_HD uint32_t retention_word(uint64_t i, uint32_t seed, uint32_t name_hash,
                                     uint32_t patch_id) {
  uint32_t w[4];
  retention_block(i >> 2, seed, name_hash, patch_id, w);
  return w[i & 3];
}

// Bits of a float as the selection key (docs/design.md §1.4, §2): -0 maps to 0, so key 0 means "zero score";
// every NaN (either sign, any payload) maps to the one key 0x7FC00000. Widening fp16/bf16 NaNs
// to fp32 may or may not quiet them depending on the code path (CPU vs GPU conversions), so
// raw NaN bits would land in different histogram bins per backend; NaN is an invalid score and
// only needs to show in bins >= 0x7F80, so one canonical key keeps all backends bit-identical.
SAFEPATCH_HD uint32_t score_key_from_bits(uint32_t bits) {
  // Written with masks, not conditionals: GCC left the merge's selection loop scalar with the
  // conditional form (the C++ merge ran 4x slower: 8.6 vs 2.0 ns per element, one core).
  const uint32_t not_minus_zero = 0u - static_cast<uint32_t>(bits != 0x80000000u);
  const uint32_t nan = 0u - static_cast<uint32_t>((bits & 0x7FFFFFFFu) > 0x7F800000u);
  return ((bits & not_minus_zero) & ~nan) | (0x7FC00000u & nan);
}

}  // namespace safepatch
