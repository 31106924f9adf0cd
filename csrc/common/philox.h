// Counter-based Philox4x32-10 (Salmon et al., SC'11), shared by the CPU and CUDA kernels so both draw
// the same bits for the same (seed, offset, element index). finetune_ext/reference/philox.py is the
// pure-PyTorch twin; tests/reference/test_philox.py checks both against the Random123 answers.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace finetune_ext {

// Philox4x32 multipliers and Weyl key increments.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t v[4];
};

FTX_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// One Philox round on the counter (c0, c1, c2, c3) with round key (k0, k1). The CPU kernel calls it over
// arrays of counters so that the compiler vectorises the rounds.
FTX_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  uint32_t hi0, hi1;
  const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
  const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

FTX_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  FTX_UNROLL
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Four random words for the element group `group` (elements 4*group .. 4*group+3).
// Counter = (group, offset) as 64-bit halves, key = seed.
FTX_HOST_DEVICE Philox4 philox_group(uint64_t seed, uint64_t offset, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), static_cast<uint32_t>(offset),
                       static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Half `half` (0: low, 1: high) of a word as a float in [0, 1) in steps of 2^-16: exact in float32, so every
// backend compares the same number. Two uniforms per word halve the Philox work of dropout, whose kernels are
// bound by it; a keep probability is resolved to 2^-16 (FlashAttention's dropout compares 8 bits).
FTX_HOST_DEVICE float philox_uniform(uint32_t word, int half) {
  return static_cast<float>((word >> (16 * half)) & 0xFFFFu) * (1.0f / 65536.0f);
}

}  // namespace finetune_ext
