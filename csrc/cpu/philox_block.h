// Philox4x32-10 over a block of consecutive groups, structure-of-arrays so that the compiler vectorises the
// rounds: the CPU kernels' source of random words (csrc/common/philox.h is the per-group rule).
#pragma once

#include <cstdint>

#include "../common/philox.h"

namespace finetune_ext {

constexpr int64_t kPhiloxBlock = 64;  // groups per block

// The 4 * count words of groups first_group .. first_group + count - 1 (count <= kPhiloxBlock), word i of
// group g at words[4 * (g - first_group) + i].
inline void philox_block(uint64_t seed, uint64_t offset, int64_t first_group, int64_t count, uint32_t* words) {
  uint32_t c0[kPhiloxBlock], c1[kPhiloxBlock], c2[kPhiloxBlock], c3[kPhiloxBlock];
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t g = static_cast<uint64_t>(first_group + j);
    c0[j] = static_cast<uint32_t>(g);
    c1[j] = static_cast<uint32_t>(g >> 32);
    c2[j] = static_cast<uint32_t>(offset);
    c3[j] = static_cast<uint32_t>(offset >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t j = 0; j < count; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t j = 0; j < count; ++j) {
    words[4 * j] = c0[j];
    words[4 * j + 1] = c1[j];
    words[4 * j + 2] = c2[j];
    words[4 * j + 3] = c3[j];
  }
}

}  // namespace finetune_ext
