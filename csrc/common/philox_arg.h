// The Philox key argument of every random op: a CPU int64 tensor [seed, offset], checked and read on the host.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace finetune_ext {

struct PhiloxSeed {
  uint64_t seed;
  uint64_t offset;
};

inline PhiloxSeed philox_seed_arg(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 2, op,
              ": expected seed to be a CPU int64 tensor of 2 elements (seed, offset), got ", seed.scalar_type(), " on ",
              seed.device(), " with ", seed.numel(), " elements");
  const at::Tensor s = seed.contiguous();
  const int64_t* p = s.const_data_ptr<int64_t>();
  return PhiloxSeed{static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1])};
}

}  // namespace finetune_ext
