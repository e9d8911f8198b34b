// Philox4x32-10 over many consecutive counter blocks at once (CPU). The rounds run outside
// and the blocks inside, as plain arrays, so the compiler turns each round into SIMD
// multiplies (32x32->64 bit) over all lanes; one Philox call covers four elements.
#pragma once

#include <cstdint>

#include "../philox.h"

namespace safepatch {
namespace cpu {

// Words of blocks block0 .. block0+L-1 in element order: words[4*l + w] = word w of block
// block0 + l, i.e. the words of elements 4*block0 .. 4*(block0+L)-1.
template <int L>
inline void philox_words_lanes(uint64_t block0, uint32_t k0, uint32_t k1, uint32_t patch_id,
                               uint32_t* __restrict__ words) {
  uint32_t c0[L], c1[L], c2[L], c3[L];
  for (int l = 0; l < L; ++l) {
    const uint64_t b = block0 + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(b);
    c1[l] = static_cast<uint32_t>(b >> 32);
    c2[l] = patch_id;
    c3[l] = 0;
  }
  for (int r = 0; r < 10; ++r) {
    const uint32_t rk0 = k0 + static_cast<uint32_t>(r) * kPhiloxW0;
    const uint32_t rk1 = k1 + static_cast<uint32_t>(r) * kPhiloxW1;
    for (int l = 0; l < L; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ rk0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ rk1;
      c0[l] = n0;
      c1[l] = static_cast<uint32_t>(p1);
      c2[l] = n2;
      c3[l] = static_cast<uint32_t>(p0);
    }
  }
  for (int l = 0; l < L; ++l) {
    words[4 * l + 0] = c0[l];
    words[4 * l + 1] = c1[l];
    words[4 * l + 2] = c2[l];
    words[4 * l + 3] = c3[l];
  }
}

// keep[4*l + w] = 1 iff that word < threshold (threshold < 2^32; 0 keeps nothing).
template <int L>
inline void philox_keep_lanes(uint64_t block0, uint32_t k0, uint32_t k1, uint32_t patch_id,
                              uint32_t threshold, uint8_t* __restrict__ keep) {
  alignas(64) uint32_t words[4 * L];
  philox_words_lanes<L>(block0, k0, k1, patch_id, words);
  for (int e = 0; e < 4 * L; ++e) keep[e] = words[e] < threshold;
}

}  // namespace cpu
}  // namespace safepatch
