// Shared by csrc/cpu/fisher_dropout.cpp and csrc/fisher_dropout.cu: input checks and the per-element rule.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common/philox.h"
#include "common/philox_arg.h"

namespace finetune_ext {

// Validates the arguments of finetune_ext::fisher_dropout for a kernel on `device_type` and returns the
// Philox seed. The Python wrapper gives friendlier errors first; these guard direct torch.ops calls.
inline PhiloxSeed check_fisher_dropout_args(const at::Tensor& x, const at::Tensor& keep,
                                            const std::optional<at::Tensor>& residual, const at::Tensor& seed,
                                            c10::DeviceType device_type) {
  TORCH_CHECK(x.device().type() == device_type, "fisher_dropout: expected x on ", device_type, ", got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "fisher_dropout: expected x to have a floating dtype (float16, bfloat16, float32, float64), got ",
              x.scalar_type());
  TORCH_CHECK(keep.scalar_type() == at::kFloat, "fisher_dropout: expected keep to have dtype float32, got ",
              keep.scalar_type());
  TORCH_CHECK(keep.device() == x.device(), "fisher_dropout: expected keep on ", x.device(), " (the device of x), got ",
              keep.device());
  const int64_t d = x.dim() == 0 ? 1 : x.size(-1);
  TORCH_CHECK(keep.dim() <= 1 && (keep.numel() == 1 || keep.numel() == d),
              "fisher_dropout: expected keep of shape [] or [1] (one site) or [", d,
              "] (x.size(-1), per feature), got ", keep.sizes());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.sizes() == x.sizes(), "fisher_dropout: expected residual of shape ", x.sizes(),
                " (the shape of x), got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), "fisher_dropout: expected residual of dtype ", x.scalar_type(),
                ", got ", r.scalar_type());
    TORCH_CHECK(r.device() == x.device(), "fisher_dropout: expected residual on ", x.device(), ", got ", r.device());
  }
  return philox_seed_arg(seed, "fisher_dropout");
}

// y = residual + (u < keep ? x * (1 / keep) : 0), in the op-math type (float for half/bfloat16).
// The multiply is kept apart from the add (no FMA) so every backend rounds the same way.
template <typename acc_t>
FTX_HOST_DEVICE acc_t dropout_value(acc_t x, float keep, float u) {
  const float scale = 1.0f / keep;
  // multiplied whatever u is, then selected: a branch-free select the CPU loops vectorise
#if defined(__CUDA_ARCH__)
  acc_t kept;
  if constexpr (sizeof(acc_t) == sizeof(double)) {
    kept = __dmul_rn(x, static_cast<acc_t>(scale));
  } else {
    kept = __fmul_rn(x, scale);
  }
#else
  const acc_t kept = x * static_cast<acc_t>(scale);
#endif
  return u < keep ? kept : acc_t(0);
}

}  // namespace finetune_ext
