// philox_block: the scalar rule of csrc/common/philox.h, and the same rounds on 8 (AVX2) or 16 (AVX-512)
// groups per instruction, four vectors in flight so that the multiplies' latency is hidden. A vector lane
// holds one group's counter word; the 32 x 32 -> 64-bit products come from two even-lane multiplies.
#include "philox_block.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#include "../common/philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FTX_X86_SIMD 1
// GCC 12's AVX-512 intrinsics start from their own "undefined" vectors, which it then reports as maybe
// uninitialised wherever they are inlined (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace finetune_ext {
namespace {

void philox_block_scalar(uint64_t seed, uint64_t offset, int64_t first_group, int64_t count, uint32_t* words) {
  for (int64_t j = 0; j < count; ++j) {
    const Philox4 r = philox_group(seed, offset, static_cast<uint64_t>(first_group + j));
    for (int i = 0; i < 4; ++i) words[4 * j + i] = r.v[i];
  }
}

#if defined(FTX_X86_SIMD)
constexpr int kInFlight = 4;  // independent vectors per round

// Low and high halves of a * m per 32-bit lane.
__attribute__((target("avx512f"))) inline void mulhilo(__m512i a, __m512i m, __m512i& lo, __m512i& hi) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// Four vectors of one word per group (16 groups each) to words[4 * g + i], 16 groups per 64 words.
__attribute__((target("avx512f"))) inline void store_interleaved(__m512i a, __m512i b, __m512i c, __m512i d,
                                                                 uint32_t* words) {
  const __m512i ab_lo = _mm512_unpacklo_epi32(a, b), ab_hi = _mm512_unpackhi_epi32(a, b);
  const __m512i cd_lo = _mm512_unpacklo_epi32(c, d), cd_hi = _mm512_unpackhi_epi32(c, d);
  // groups 4k + q of 128-bit lane k, q = 0..3
  const __m512i q0 = _mm512_unpacklo_epi64(ab_lo, cd_lo), q1 = _mm512_unpackhi_epi64(ab_lo, cd_lo);
  const __m512i q2 = _mm512_unpacklo_epi64(ab_hi, cd_hi), q3 = _mm512_unpackhi_epi64(ab_hi, cd_hi);
  const __m512i v0 = _mm512_shuffle_i32x4(q0, q1, 0x44), v1 = _mm512_shuffle_i32x4(q2, q3, 0x44);
  const __m512i v2 = _mm512_shuffle_i32x4(q0, q1, 0xEE), v3 = _mm512_shuffle_i32x4(q2, q3, 0xEE);
  _mm512_storeu_si512(words, _mm512_shuffle_i32x4(v0, v1, 0x88));
  _mm512_storeu_si512(words + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
  _mm512_storeu_si512(words + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
  _mm512_storeu_si512(words + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
}

// Whole multiples of 16 * kInFlight groups; returns how many groups it did.
__attribute__((target("avx512f"))) int64_t philox_block_avx512(uint64_t seed, uint64_t offset, int64_t first_group,
                                                               int64_t count, uint32_t* words) {
  constexpr int64_t kStep = 16 * kInFlight;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t done = 0;
  for (; done + kStep <= count; done += kStep) {
    __m512i c0[kInFlight], c1[kInFlight], c2[kInFlight], c3[kInFlight];
    for (int v = 0; v < kInFlight; ++v) {
      // group = base + lane: the low word may wrap within a vector, the high word then carries
      const uint64_t base = static_cast<uint64_t>(first_group + done + 16 * v);
      c0[v] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base))), lane);
      const __mmask16 carry = _mm512_cmplt_epu32_mask(c0[v], lane);
      c1[v] = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(base >> 32)), carry,
                                    _mm512_set1_epi32(static_cast<int>(base >> 32)), _mm512_set1_epi32(1));
      c2[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
      c3[v] = _mm512_set1_epi32(static_cast<int>(offset >> 32));
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < kInFlight; ++v) {
        __m512i lo0, hi0, lo1, hi1;
        mulhilo(c0[v], m0, lo0, hi0);
        mulhilo(c2[v], m1, lo1, hi1);
        c0[v] = _mm512_ternarylogic_epi32(hi1, c1[v], key0, 0x96);  // three-way xor
        c1[v] = lo1;
        c2[v] = _mm512_ternarylogic_epi32(hi0, c3[v], key1, 0x96);
        c3[v] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int v = 0; v < kInFlight; ++v) store_interleaved(c0[v], c1[v], c2[v], c3[v], words + 4 * (done + 16 * v));
  }
  return done;
}

__attribute__((target("avx2"))) inline void mulhilo(__m256i a, __m256i m, __m256i& lo, __m256i& hi) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Four vectors of one word per group (8 groups each) to words[4 * g + i], 8 groups per 32 words.
__attribute__((target("avx2"))) inline void store_interleaved(__m256i a, __m256i b, __m256i c, __m256i d,
                                                              uint32_t* words) {
  const __m256i ab_lo = _mm256_unpacklo_epi32(a, b), ab_hi = _mm256_unpackhi_epi32(a, b);
  const __m256i cd_lo = _mm256_unpacklo_epi32(c, d), cd_hi = _mm256_unpackhi_epi32(c, d);
  // groups 4k + q of 128-bit lane k, q = 0..3
  const __m256i q0 = _mm256_unpacklo_epi64(ab_lo, cd_lo), q1 = _mm256_unpackhi_epi64(ab_lo, cd_lo);
  const __m256i q2 = _mm256_unpacklo_epi64(ab_hi, cd_hi), q3 = _mm256_unpackhi_epi64(ab_hi, cd_hi);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words), _mm256_permute2x128_si256(q0, q1, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 8), _mm256_permute2x128_si256(q2, q3, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 16), _mm256_permute2x128_si256(q0, q1, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 24), _mm256_permute2x128_si256(q2, q3, 0x31));
}

__attribute__((target("avx2"))) int64_t philox_block_avx2(uint64_t seed, uint64_t offset, int64_t first_group,
                                                          int64_t count, uint32_t* words) {
  constexpr int64_t kStep = 8 * kInFlight;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  int64_t done = 0;
  for (; done + kStep <= count; done += kStep) {
    __m256i c0[kInFlight], c1[kInFlight], c2[kInFlight], c3[kInFlight];
    for (int v = 0; v < kInFlight; ++v) {
      const uint64_t base = static_cast<uint64_t>(first_group + done + 8 * v);
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base))), lane);
      // unsigned c0 < lane (wrapped) as a signed compare of sign-flipped values; true lanes are -1
      const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(lane, sign), _mm256_xor_si256(c0[v], sign));
      c1[v] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(base >> 32)), wrapped);
      c2[v] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
      c3[v] = _mm256_set1_epi32(static_cast<int>(offset >> 32));
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < kInFlight; ++v) {
        __m256i lo0, hi0, lo1, hi1;
        mulhilo(c0[v], m0, lo0, hi0);
        mulhilo(c2[v], m1, lo1, hi1);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), key0);
        c1[v] = lo1;
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), key1);
        c3[v] = lo0;
      }
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    for (int v = 0; v < kInFlight; ++v) store_interleaved(c0[v], c1[v], c2[v], c3[v], words + 4 * (done + 8 * v));
  }
  return done;
}

using VectorBlock = int64_t (*)(uint64_t, uint64_t, int64_t, int64_t, uint32_t*);

// The widest path the CPU has, capped by FINETUNE_EXT_SIMD=avx2|scalar (for tests and comparisons).
VectorBlock vector_block() {
  static const VectorBlock chosen = [] {
    const char* cap = std::getenv("FINETUNE_EXT_SIMD");
    const std::string level = cap == nullptr ? "avx512" : cap;
    TORCH_CHECK(level == "avx512" || level == "avx2" || level == "scalar",
                "FINETUNE_EXT_SIMD: expected avx512, avx2 or scalar, got '", level, "'");
    __builtin_cpu_init();
    if (level == "avx512" && __builtin_cpu_supports("avx512f")) return &philox_block_avx512;
    if (level != "scalar" && __builtin_cpu_supports("avx2")) return &philox_block_avx2;
    return static_cast<VectorBlock>(nullptr);
  }();
  return chosen;
}
#endif

}  // namespace

void philox_block(uint64_t seed, uint64_t offset, int64_t first_group, int64_t count, uint32_t* words) {
  int64_t done = 0;
#if defined(FTX_X86_SIMD)
  if (const VectorBlock vector = vector_block()) done = vector(seed, offset, first_group, count, words);
#endif
  philox_block_scalar(seed, offset, first_group + done, count - done, words + 4 * done);
}

}  // namespace finetune_ext
