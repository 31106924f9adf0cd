// Autograd of finetune_ext::linchain_compose for every device (its kernels: csrc/linchain_compose.cu and
// csrc/cpu/linchain_compose.cpp). In C++ rather than torch.library's Python wrapper, whose host cost per call was
// larger than the kernels' at adapter sizes (as for lora_linear, csrc/lora_linear.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/autograd.h"

namespace finetune_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Pair = std::tuple<at::Tensor, at::Tensor>;

class LinChainComposeFunction : public torch::autograd::Function<LinChainComposeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& W, const std::optional<at::Tensor>& b) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("finetune_ext::linchain_compose", "")
                               .typed<Pair(const at::Tensor&, const std::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [M, beff] = op.call(W, b);
    ctx->save_for_backward({W, b.value_or(at::Tensor())});
    return {M, beff};
  }

  // grads are (dL/dM, dL/dbeff), zeros where an output was unused (materialised by autograd).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("finetune_ext::linchain_compose_backward", "")
            .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
    // Unpacked above the guard: under activation checkpointing, unpacking recomputes the forward, which must go
    // through autograd to save its tensors again.
    const variable_list s = ctx->get_saved_variables();
    at::AutoDispatchBelowADInplaceOrView guard;
    const std::optional<at::Tensor> b = defined_or_none(s[1]);
    auto [gW, gb] = op.call(grads[0], grads[1], s[0], b);
    return {gW, b.has_value() ? gb : at::Tensor()};
  }
};

Pair linchain_compose_autograd(const at::Tensor& W, const std::optional<at::Tensor>& b) {
  const variable_list out = LinChainComposeFunction::apply(W, b);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, Autograd, m) { m.impl("linchain_compose", &linchain_compose_autograd); }

}  // namespace finetune_ext
