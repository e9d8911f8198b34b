// Philox4x32-10 over many consecutive counter blocks at once (CPU). One Philox call covers
// four elements. The rounds run in SIMD registers over 16 (AVX-512) or 8 (AVX2) blocks at a
// time: a 32x32->64-bit multiply per lane is two vpmuludq on even/odd lanes (compilers left
// alone emit the slow 64x64 vpmullq here). Other CPUs use the portable scalar loop.
#pragma once

#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../philox.h"

namespace safepatch {
namespace cpu {

namespace detail {

#if defined(__AVX512F__)
constexpr int kSimdBlocks = 16;
using vec = __m512i;
inline vec set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline vec xor3(vec a, vec b, vec c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
inline void mulhilo(vec m, vec x, vec& hi, vec& lo) {
  const vec even = _mm512_mul_epu32(x, m);
  const vec odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  lo = _mm512_mullo_epi32(x, m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
inline vec counter_low(uint64_t block0) {
  return _mm512_add_epi32(set1(static_cast<uint32_t>(block0)),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
inline void store(uint32_t* p, vec v) { _mm512_storeu_si512(reinterpret_cast<void*>(p), v); }
// (c0, c1, c2, c3) hold word 0..3 of blocks 0..15; write the 64 words in element order.
inline void store_element_order(uint32_t* out, vec c0, vec c1, vec c2, vec c3) {
  const vec t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const vec t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  // u_r: blocks r, r+4, r+8, r+12, one per 128-bit lane, words in order.
  const vec u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const vec u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const vec v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
  const vec v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  store(out + 0, _mm512_shuffle_i32x4(v0, v1, 0x88));
  store(out + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
  store(out + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
  store(out + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
}
#elif defined(__AVX2__)
constexpr int kSimdBlocks = 8;
using vec = __m256i;
inline vec set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline vec xor3(vec a, vec b, vec c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline void mulhilo(vec m, vec x, vec& hi, vec& lo) {
  const vec even = _mm256_mul_epu32(x, m);
  const vec odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  lo = _mm256_mullo_epi32(x, m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
inline vec counter_low(uint64_t block0) {
  return _mm256_add_epi32(set1(static_cast<uint32_t>(block0)),
                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline void store(uint32_t* p, vec v) { _mm256_storeu_si256(reinterpret_cast<vec*>(p), v); }
// (c0, c1, c2, c3) hold word 0..3 of blocks 0..7; write the 32 words in element order.
inline void store_element_order(uint32_t* out, vec c0, vec c1, vec c2, vec c3) {
  const vec t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const vec t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  // u_r: blocks r and r+4, one per 128-bit lane.
  const vec u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const vec u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  store(out + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
  store(out + 8, _mm256_permute2x128_si256(u2, u3, 0x20));
  store(out + 16, _mm256_permute2x128_si256(u0, u1, 0x31));
  store(out + 24, _mm256_permute2x128_si256(u2, u3, 0x31));
}
#endif

// Scalar path for any block range (also the tail of a range that straddles a 2^32 block).
inline void blocks_scalar(uint64_t block0, int count, uint32_t k0, uint32_t k1,
                          uint32_t patch_id, uint32_t* __restrict__ words) {
  for (int l = 0; l < count; ++l) retention_block(block0 + l, k0, k1, patch_id, words + 4 * l);
}

}  // namespace detail

// Words of blocks block0 .. block0+L-1 in element order: words[4*l + w] = word w of block
// block0 + l, i.e. the words of elements 4*block0 .. 4*(block0+L)-1.
template <int L>
inline void philox_words_lanes(uint64_t block0, uint32_t k0, uint32_t k1, uint32_t patch_id,
                               uint32_t* __restrict__ words) {
#if defined(__AVX512F__) || defined(__AVX2__)
  using namespace detail;
  static_assert(L % kSimdBlocks == 0, "L must be a multiple of the SIMD width");
  const vec m0 = set1(kPhiloxM0), m1 = set1(kPhiloxM1);
  for (int g = 0; g < L; g += kSimdBlocks) {
    const uint64_t b0 = block0 + static_cast<uint64_t>(g);
    const uint64_t last = b0 + kSimdBlocks - 1;
    if ((b0 >> 32) != (last >> 32)) {  // the high counter word changes inside this group
      blocks_scalar(b0, kSimdBlocks, k0, k1, patch_id, words + 4 * g);
      continue;
    }
    vec c0 = counter_low(b0), c1 = set1(static_cast<uint32_t>(b0 >> 32));
    vec c2 = set1(patch_id), c3 = set1(0);
    uint32_t rk0 = k0, rk1 = k1;
    for (int r = 0; r < 10; ++r) {
      vec hi0, lo0, hi1, lo1;
      mulhilo(m0, c0, hi0, lo0);
      mulhilo(m1, c2, hi1, lo1);
      c0 = xor3(hi1, c1, set1(rk0));
      c1 = lo1;
      c2 = xor3(hi0, c3, set1(rk1));
      c3 = lo0;
      rk0 += kPhiloxW0;
      rk1 += kPhiloxW1;
    }
    store_element_order(words + 4 * g, c0, c1, c2, c3);
  }
#else
  detail::blocks_scalar(block0, L, k0, k1, patch_id, words);
#endif
}

}  // namespace cpu
}  // namespace safepatch
