// Philox4x32-10 over a block of consecutive groups: the CPU kernels' source of random words
// (csrc/common/philox.h is the per-group rule). philox_block.cpp runs 16 or 8 groups per vector instruction
// (AVX-512 or AVX2, chosen once from the CPU) and the scalar rule elsewhere; the words are the same either way.
#pragma once

#include <cstdint>

namespace finetune_ext {

constexpr int64_t kPhiloxBlock = 64;  // groups per block

// The 4 * count words of groups first_group .. first_group + count - 1 (count <= kPhiloxBlock), word i of
// group g at words[4 * (g - first_group) + i].
void philox_block(uint64_t seed, uint64_t offset, int64_t first_group, int64_t count, uint32_t* words);

}  // namespace finetune_ext
