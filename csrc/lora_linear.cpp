// finetune_ext::lora_linear and its backward, one implementation for CPU and CUDA: the adapted layer
//   y = x W^T + bias + scale * u B^T,   u = dropout(x) A^T + c
// as four GEMMs whose epilogues do the adds (addmm with beta = 1 accumulates the low-rank term into the base
// output in place, and the rank-space bias c rides on the A GEMM). Dropout is the seeded fisher_dropout, so
// no mask and no dropped copy of x is kept: the backward redraws the mask and fuses it with the base
// gradient (dx = g W + mask * (du A) / keep in one pass). Only u ([tokens, r]) is saved. The base weight and
// bias are frozen: no gradient is computed for them. Without a weight (a base the caller runs itself, such as a
// bitsandbytes 4-bit layer whose packed weight must never be read as a matrix) the op is the adapter path alone,
// y = bias + scale * u B^T. With noise_std, the base path uses W + eps
// (gaussian_perturb, LoRA-GGPO / Flat-LoRA): the perturbed weight is a temporary of this call, W itself is
// never written, and the backward regenerates it from the key instead of saving it.
//
// Its autograd is here too (LoraLinearFunction, registered for the Autograd key), not in Python: the op runs once
// per adapted layer and step, and torch.library's Python autograd wrapper cost about 80 us a call on the host in
// the forward alone, twice what the op itself takes at small sizes, where a GPU step is bound by the host.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common/autograd.h"

namespace finetune_ext {
namespace {

at::Tensor seeded_dropout(const at::Tensor& x, const at::Tensor& keep, const std::optional<at::Tensor>& residual,
                          const at::Tensor& seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("finetune_ext::fisher_dropout", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               const at::Tensor&)>();
  return op.call(x, keep, residual, seed);
}

// The base weight the layer multiplies with: W, or the temporary W + eps of the noise key.
at::Tensor base_weight(const at::Tensor& weight, const std::optional<at::Tensor>& noise_std,
                       const at::Tensor& noise_seed) {
  if (!noise_std.has_value()) return weight;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("finetune_ext::gaussian_perturb", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(weight, *noise_std, noise_seed);
}

// weight may be undefined (the adapter path alone): the sizes then come from A [r, in] and B [out, r].
void check_lora_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& A, const at::Tensor& B, const std::optional<at::Tensor>& c) {
  TORCH_CHECK((!weight.defined() || weight.dim() == 2) && A.dim() == 2 && B.dim() == 2,
              "lora_linear: expected 2-d weight [out, in], A [r, in] and B [out, r], got ",
              weight.defined() ? weight.sizes() : at::IntArrayRef{}, ", ", A.sizes(), ", ", B.sizes());
  const int64_t in = weight.defined() ? weight.size(1) : A.size(1), out = weight.defined() ? weight.size(0) : B.size(0),
                r = A.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "lora_linear: expected x with last dimension ", in,
              weight.defined() ? " (weight.size(1))" : " (A.size(1))", ", got ", x.sizes());
  TORCH_CHECK(A.size(1) == in && B.size(0) == out && B.size(1) == r, "lora_linear: expected A [", r, ", ", in,
              "] and B [", out, ", ", r, "], got ", A.sizes(), " and ", B.sizes());
  std::vector<const at::Tensor*> all = {&A, &B};
  if (weight.defined()) all.push_back(&weight);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "lora_linear: expected bias [", out, "], got ",
                bias->sizes());
    all.push_back(&*bias);
  }
  if (c.has_value()) {
    TORCH_CHECK(c->dim() == 1 && c->size(0) == r, "lora_linear: expected c [", r, "], got ", c->sizes());
    all.push_back(&*c);
  }
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "lora_linear: expected every tensor of dtype ", x.scalar_type(), " on ", x.device(), " (like x), got ",
                t->scalar_type(), " on ", t->device());
  }
}

std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const std::optional<at::Tensor>& weight_opt,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                               const at::Tensor& B, const std::optional<at::Tensor>& c, double scale,
                                               const std::optional<at::Tensor>& keep, const at::Tensor& seed,
                                               const std::optional<at::Tensor>& noise_std,
                                               const at::Tensor& noise_seed) {
  const at::Tensor weight = weight_opt.value_or(at::Tensor());
  check_lora_args(x, weight, bias, A, B, c);
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  const at::Tensor xd = keep.has_value() ? seeded_dropout(x2, *keep, std::nullopt, seed) : x2;
  const at::Tensor u = c.has_value() ? at::addmm(*c, xd, A.t()) : at::mm(xd, A.t());
  at::Tensor y;
  if (weight.defined()) {
    const at::Tensor w = base_weight(weight, noise_std, noise_seed);
    y = bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
    y.addmm_(u, B.t(), /*beta=*/1, /*alpha=*/scale);
  } else {
    TORCH_CHECK(!noise_std.has_value(), "lora_linear: noise_std perturbs the base weight; the call has none");
    y = bias.has_value() ? at::addmm(*bias, u, B.t(), /*beta=*/1, /*alpha=*/scale) : at::mm(u, B.t()).mul_(scale);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = B.size(0);
  return {y.view(shape), u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& weight_opt, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& u, double scale, const std::optional<at::Tensor>& keep,
    const at::Tensor& seed, const std::optional<at::Tensor>& noise_std, const at::Tensor& noise_seed,
    std::array<bool, 4> output_mask) {
  const at::Tensor weight = weight_opt.value_or(at::Tensor());
  check_lora_args(x, weight, std::nullopt, A, B, std::nullopt);
  const at::Tensor g = grad.reshape({-1, B.size(0)});
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  const at::Tensor none = at::empty({0}, x.options());
  const at::Tensor du = at::mm(g, B).mul_(scale);
  at::Tensor dx = none, dA = none, dB = none, dc = none;
  if (output_mask[0] && weight.defined()) {
    const at::Tensor w = base_weight(weight, noise_std, noise_seed);
    dx = keep.has_value() ? seeded_dropout(at::mm(du, A), *keep, at::mm(g, w), seed) : at::mm(g, w).addmm_(du, A);
    dx = dx.view(x.sizes());
  } else if (output_mask[0]) {
    dx = (keep.has_value() ? seeded_dropout(at::mm(du, A), *keep, std::nullopt, seed) : at::mm(du, A)).view(x.sizes());
  }
  if (output_mask[1]) {
    const at::Tensor xd = keep.has_value() ? seeded_dropout(x2, *keep, std::nullopt, seed) : x2;
    dA = at::mm(du.t(), xd);
  }
  if (output_mask[2]) dB = at::mm(g.t(), u).mul_(scale);
  if (output_mask[3]) dc = du.sum(0);
  return {dx, dA, dB, dc};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                               const std::optional<at::Tensor>& c, double scale, const std::optional<at::Tensor>& keep,
                               const at::Tensor& seed, const std::optional<at::Tensor>& noise_std,
                               const at::Tensor& noise_seed) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("finetune_ext::lora_linear", "").typed<decltype(lora_linear)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, u] = op.call(x, weight, bias, A, B, c, scale, keep, seed, noise_std, noise_seed);
    ctx->mark_non_differentiable({u});
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), A, B, u, keep.value_or(at::Tensor()), seed,
                            noise_std.value_or(at::Tensor()), noise_seed});
    ctx->saved_data["scale"] = scale;
    // The gradients to compute: x, A, B, c (weight and bias are frozen: the kernel computes none for them).
    ctx->saved_data["need"] =
        c10::List<bool>({x.requires_grad(), A.requires_grad(), B.requires_grad(), c.has_value() && c->requires_grad()});
    return {y, u};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("finetune_ext::lora_linear_backward", "")
                               .typed<decltype(lora_linear_backward)>();
    // Below autograd, as in the forward: the dropout calls inside skip fisher_dropout's (Python) autograd wrapper.
    // Unpacked above the guard: under activation checkpointing, unpacking recomputes the forward, which must go
    // through autograd to save its tensors again.
    const variable_list s = ctx->get_saved_variables();
    at::AutoDispatchBelowADInplaceOrView guard;
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    const std::array<bool, 4> mask = {need[0], need[1], need[2], need[3]};
    auto [dx, dA, dB, dc] =
        op.call(grads[0].contiguous(), s[0], defined_or_none(s[1]), s[2], s[3], s[4],
                ctx->saved_data["scale"].toDouble(), defined_or_none(s[5]), s[6], defined_or_none(s[7]), s[8], mask);
    const at::Tensor none;
    return {mask[0] ? dx : none,
            none,
            none,
            mask[1] ? dA : none,
            mask[2] ? dB : none,
            mask[3] ? dc : none,
            none,
            none,
            none,
            none,
            none};
  }
};

std::tuple<at::Tensor, at::Tensor> lora_linear_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                        const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                        const at::Tensor& B, const std::optional<at::Tensor>& c,
                                                        double scale, const std::optional<at::Tensor>& keep,
                                                        const at::Tensor& seed,
                                                        const std::optional<at::Tensor>& noise_std,
                                                        const at::Tensor& noise_seed) {
  const variable_list out =
      LoraLinearFunction::apply(x, weight, bias, A, B, c, scale, keep, seed, noise_std, noise_seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, Autograd, m) { m.impl("lora_linear", &lora_linear_autograd); }

TORCH_LIBRARY_IMPL(finetune_ext, CPU, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}

#ifdef FINETUNE_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(finetune_ext, CUDA, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}
#endif

}  // namespace finetune_ext
