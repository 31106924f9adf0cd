// finetune_ext::linchain_linear: a LinChain layer as one operator call and one autograd node,
//   y = lora_linear(x, W, bias, M A, B, beff),   (M, beff) = linchain_compose(mixer_weight, mixer_bias),
// for an adapter called on its own (in a model, adapters/model.py composes every chain once per forward and
// each layer calls lora_linear). No kernel of its own: the compose, the product M A and their backward run
// inside this op, one implementation for CPU and CUDA. As separate operators the chain cost a layer call about
// 60 dispatcher events and five autograd nodes, more host time than the GEMMs at the sizes where a GPU step is
// bound by the host.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/autograd.h"

namespace finetune_ext {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

void check_mixer_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& mixer_weight,
                      const OptTensor& mixer_bias) {
  const int64_t r = A.size(0);
  TORCH_CHECK(
      mixer_weight.dim() == 3 && mixer_weight.size(0) >= 1 && mixer_weight.size(1) == r && mixer_weight.size(2) == r,
      "linchain_linear: expected mixer_weight [k, ", r, ", ", r, "] with k >= 1 (r = A.size(0)), got ",
      mixer_weight.sizes());
  TORCH_CHECK(!mixer_bias.has_value() ||
                  (mixer_bias->dim() == 2 && mixer_bias->size(0) == mixer_weight.size(0) && mixer_bias->size(1) == r),
              "linchain_linear: expected mixer_bias [", mixer_weight.size(0), ", ", r, "], got ",
              mixer_bias.has_value() ? mixer_bias->sizes() : at::IntArrayRef());
  for (const at::Tensor* t : {&mixer_weight, mixer_bias.has_value() ? &*mixer_bias : &mixer_weight}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "linchain_linear: expected the mixers of dtype ", x.scalar_type(), " on ", x.device(),
                " (like x), got ", t->scalar_type(), " on ", t->device());
  }
}

// (M [r, r], beff [r]) of one chain, through linchain_compose's kernel (a batch of one).
Pair compose(const at::Tensor& mixer_weight, const OptTensor& mixer_bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("finetune_ext::linchain_compose", "")
                             .typed<Pair(const at::Tensor&, const OptTensor&)>();
  const OptTensor b = mixer_bias.has_value() ? OptTensor(mixer_bias->unsqueeze(0)) : std::nullopt;
  auto [M, beff] = op.call(mixer_weight.unsqueeze(0), b);
  return {M.squeeze(0), beff.squeeze(0)};
}

// Gradients of the mixers from those of M and beff.
Pair compose_backward(const at::Tensor& grad_M, const at::Tensor& grad_beff, const at::Tensor& mixer_weight,
                      const OptTensor& mixer_bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("finetune_ext::linchain_compose_backward", "")
                             .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>();
  const OptTensor b = mixer_bias.has_value() ? OptTensor(mixer_bias->unsqueeze(0)) : std::nullopt;
  auto [gW, gb] = op.call(grad_M.unsqueeze(0), grad_beff.unsqueeze(0), mixer_weight.unsqueeze(0), b);
  return {gW.squeeze(0), mixer_bias.has_value() ? gb.squeeze(0) : gb};
}

Pair lora_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& A,
                 const at::Tensor& B, const OptTensor& c, double scale, const OptTensor& keep, const at::Tensor& seed,
                 const OptTensor& noise_std, const at::Tensor& noise_seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("finetune_ext::lora_linear", "")
                             .typed<Pair(const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                         const at::Tensor&, const OptTensor&, double, const OptTensor&,
                                         const at::Tensor&, const OptTensor&, const at::Tensor&)>();
  return op.call(x, weight, bias, A, B, c, scale, keep, seed, noise_std, noise_seed);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads lora_linear_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                           const at::Tensor& B, const at::Tensor& u, double scale, const OptTensor& keep,
                           const at::Tensor& seed, const OptTensor& noise_std, const at::Tensor& noise_seed,
                           std::array<bool, 4> mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("finetune_ext::lora_linear_backward", "")
          .typed<Grads(const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, double, const OptTensor&, const at::Tensor&, const OptTensor&,
                       const at::Tensor&, std::array<bool, 4>)>();
  return op.call(grad, x, weight, A, B, u, scale, keep, seed, noise_std, noise_seed, mask);
}

// The forward and what its backward needs: y, u (lora_linear's rank-space activations), M and M A.
struct Forward {
  at::Tensor y, u, M, MA;
};

Forward forward_parts(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& A,
                      const at::Tensor& B, const at::Tensor& mixer_weight, const OptTensor& mixer_bias, double scale,
                      const OptTensor& keep, const at::Tensor& seed, const OptTensor& noise_std,
                      const at::Tensor& noise_seed) {
  check_mixer_args(x, A, mixer_weight, mixer_bias);
  auto [M, beff] = compose(mixer_weight, mixer_bias);
  const OptTensor c = mixer_bias.has_value() ? OptTensor(beff) : std::nullopt;
  const at::Tensor MA = at::mm(M, A);
  auto [y, u] = lora_linear(x, weight, bias, MA, B, c, scale, keep, seed, noise_std, noise_seed);
  return {y, u, M, MA};
}

// The layer without autograd (inference tensors, calls below the autograd key).
at::Tensor linchain_linear(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& A,
                           const at::Tensor& B, const at::Tensor& mixer_weight, const OptTensor& mixer_bias,
                           double scale, const OptTensor& keep, const at::Tensor& seed, const OptTensor& noise_std,
                           const at::Tensor& noise_seed) {
  return forward_parts(x, weight, bias, A, B, mixer_weight, mixer_bias, scale, keep, seed, noise_std, noise_seed).y;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class LinChainLinearFunction : public torch::autograd::Function<LinChainLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& mixer_weight, const OptTensor& mixer_bias, double scale,
                               const OptTensor& keep, const at::Tensor& seed, const OptTensor& noise_std,
                               const at::Tensor& noise_seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const Forward f =
        forward_parts(x, weight, bias, A, B, mixer_weight, mixer_bias, scale, keep, seed, noise_std, noise_seed);
    ctx->save_for_backward({x, weight, A, B, f.u, f.M, f.MA, mixer_weight, mixer_bias.value_or(at::Tensor()),
                            keep.value_or(at::Tensor()), seed, noise_std.value_or(at::Tensor()), noise_seed});
    ctx->saved_data["scale"] = scale;
    // The gradients to compute: x, A, B, mixer_weight, mixer_bias (weight and bias are frozen).
    ctx->saved_data["need"] =
        c10::List<bool>({x.requires_grad(), A.requires_grad(), B.requires_grad(), mixer_weight.requires_grad(),
                         mixer_bias.has_value() && mixer_bias->requires_grad()});
    return {f.y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Unpacked above the guard: under activation checkpointing, unpacking recomputes the forward, which must go
    // through autograd to save its tensors again.
    const variable_list s = ctx->get_saved_variables();
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor &x = s[0], &A = s[2], &M = s[5], &MA = s[6], &mixer_weight = s[7];
    const OptTensor mixer_bias = defined_or_none(s[8]);
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    const bool need_x = need[0], need_A = need[1], need_B = need[2], need_mixers = need[3] || need[4];
    // lora_linear's gradients w.r.t. (x, M A, B, beff): M A's feeds A and the mixers, beff's the mixers.
    const std::array<bool, 4> mask = {need_x, need_A || need_mixers, need_B, mixer_bias.has_value() && need_mixers};
    auto [dx, dMA, dB, dbeff] =
        lora_linear_backward(grads[0].contiguous(), x, s[1], MA, s[3], s[4], ctx->saved_data["scale"].toDouble(),
                             defined_or_none(s[9]), s[10], defined_or_none(s[11]), s[12], mask);
    const at::Tensor none;
    at::Tensor dW, db;
    if (need_mixers) {
      const at::Tensor dM = at::mm(dMA, A.t());
      const at::Tensor gbeff = mixer_bias.has_value() ? dbeff : at::zeros({M.size(0)}, M.options());
      std::tie(dW, db) = compose_backward(dM, gbeff, mixer_weight, mixer_bias);
    }
    return {need_x ? dx : none,
            none,
            none,
            need_A ? at::mm(M.t(), dMA) : none,
            need_B ? dB : none,
            need[3] ? dW : none,
            need[4] ? db : none,
            none,
            none,
            none,
            none,
            none};
  }
};

at::Tensor linchain_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                    const at::Tensor& A, const at::Tensor& B, const at::Tensor& mixer_weight,
                                    const OptTensor& mixer_bias, double scale, const OptTensor& keep,
                                    const at::Tensor& seed, const OptTensor& noise_std, const at::Tensor& noise_seed) {
  return LinChainLinearFunction::apply(x, weight, bias, A, B, mixer_weight, mixer_bias, scale, keep, seed, noise_std,
                                       noise_seed)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, Autograd, m) { m.impl("linchain_linear", &linchain_linear_autograd); }

TORCH_LIBRARY_IMPL(finetune_ext, CPU, m) { m.impl("linchain_linear", &linchain_linear); }

#ifdef FINETUNE_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(finetune_ext, CUDA, m) { m.impl("linchain_linear", &linchain_linear); }
#endif

}  // namespace finetune_ext
