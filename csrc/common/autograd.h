// Small helpers of the C++ autograd functions (csrc/*_autograd.cpp, csrc/lora_linear.cpp, csrc/linchain_linear.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace finetune_ext {

// A saved optional tensor back as an optional (save_for_backward stores std::nullopt as an undefined tensor).
inline std::optional<at::Tensor> defined_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace finetune_ext
