// Shared by the CPU and CUDA kernels of finetune_ext::softmax_ce_hessian_vp: argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>

namespace finetune_ext {

inline void check_softmax_ce_hessian_vp_args(const at::Tensor& logits, const at::Tensor& V,
                                             const std::optional<at::Tensor>& labels, c10::DeviceType device_type) {
  TORCH_CHECK(logits.device().type() == device_type, "softmax_ce_hessian_vp: expected logits on ", device_type,
              ", got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, "softmax_ce_hessian_vp: expected logits of shape [N, C], got ", logits.sizes());
  TORCH_CHECK(V.dim() == 3 && V.size(1) == logits.size(0) && V.size(2) == logits.size(1),
              "softmax_ce_hessian_vp: expected V of shape [m, ", logits.size(0), ", ", logits.size(1), "], got ",
              V.sizes());
  TORCH_CHECK(V.device() == logits.device(), "softmax_ce_hessian_vp: expected V on ", logits.device(), ", got ",
              V.device());
  for (const at::Tensor* t : {&logits, &V}) {
    const auto st = t->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble,
                "softmax_ce_hessian_vp: expected float32, bfloat16, float16 or float64 inputs, got ", st);
  }
  TORCH_CHECK((logits.scalar_type() == at::kDouble) == (V.scalar_type() == at::kDouble),
              "softmax_ce_hessian_vp: float64 logits need float64 V and vice versa, got ", logits.scalar_type(),
              " and ", V.scalar_type());
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->dim() == 1 && labels->size(0) == logits.size(0),
                "softmax_ce_hessian_vp: expected labels int64 of shape [", logits.size(0), "], got ",
                labels->scalar_type(), " ", labels->sizes());
    TORCH_CHECK(labels->device() == logits.device(), "softmax_ce_hessian_vp: expected labels on ", logits.device(),
                ", got ", labels->device());
  }
}

// What both backends launch on: contiguous inputs, the scale in the accumulation type (float64 for float64 V,
// else float32) and the uninitialised output, after the argument checks.
struct HessianVpTensors {
  at::Tensor logits, V, labels, scale, out;  // labels and scale undefined when not given
};

inline HessianVpTensors prepare_softmax_ce_hessian_vp(const at::Tensor& logits, const at::Tensor& V,
                                                      const std::optional<at::Tensor>& labels,
                                                      const std::optional<at::Tensor>& scale,
                                                      c10::DeviceType device_type) {
  check_softmax_ce_hessian_vp_args(logits, V, labels, device_type);
  at::Tensor s;
  if (scale.has_value()) {
    TORCH_CHECK(scale->dim() == 0 && scale->device() == logits.device(),
                "softmax_ce_hessian_vp: expected scale as a 0-dim tensor on ", logits.device(), ", got ",
                scale->sizes(), " on ", scale->device());
    s = scale->to(V.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  }
  return {logits.contiguous(), V.contiguous(), labels.has_value() ? labels->contiguous() : at::Tensor(), s,
          at::empty(V.sizes(), V.options())};
}

}  // namespace finetune_ext
