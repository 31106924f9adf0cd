// CPU kernels of finetune_ext::linchain_compose and its backward: chains split across threads, each chain
// composed by the shared per-chain code in linchain_compose.h with a thread-local workspace.
#include "../linchain_compose.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace finetune_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> linchain_compose_cpu(const at::Tensor& W, const std::optional<at::Tensor>& b) {
  const LinchainTensors t = prepare_linchain_compose(W, b, c10::DeviceType::CPU);
  const at::Tensor &w = t.w, &bias = t.bias, &M = t.M, &beff = t.beff;
  const int64_t n = W.size(0), k = W.size(1), r = W.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "linchain_compose_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* mp = M.mutable_data_ptr<scalar_t>();
    scalar_t* ep = beff.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> ws(linchain_workspace(k, r));
      for (int64_t j = begin; j < end; ++j) {
        compose_chain<scalar_t, acc_t>(wp + j * k * r * r, bp != nullptr ? bp + j * k * r : nullptr, mp + j * r * r,
                                       ep + j * r, ws.data(), k, r, 0, 1, NoSync{});
      }
    });
  });
  return {M, beff};
}

std::tuple<at::Tensor, at::Tensor> linchain_compose_backward_cpu(const at::Tensor& grad_M, const at::Tensor& grad_beff,
                                                                 const at::Tensor& W,
                                                                 const std::optional<at::Tensor>& b) {
  const LinchainBackwardTensors t = prepare_linchain_compose_backward(grad_M, grad_beff, W, b, c10::DeviceType::CPU);
  const at::Tensor &w = t.w, &bias = t.bias, &gm = t.gM, &ge = t.gbeff, &gW = t.gW, &gb = t.gb;
  const int64_t n = W.size(0), k = W.size(1), r = W.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "linchain_compose_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gwp = gW.mutable_data_ptr<scalar_t>();
    scalar_t* gbp = bias.defined() ? gb.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> ws(linchain_workspace(k, r));
      for (int64_t j = begin; j < end; ++j) {
        compose_chain_backward<scalar_t, acc_t>(
            wp + j * k * r * r, bp != nullptr ? bp + j * k * r : nullptr, gm.const_data_ptr<scalar_t>() + j * r * r,
            ge.const_data_ptr<scalar_t>() + j * r, gwp + j * k * r * r, gbp != nullptr ? gbp + j * k * r : nullptr,
            ws.data(), k, r, 0, 1, NoSync{});
      }
    });
  });
  return {gW, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CPU, m) {
  m.impl("linchain_compose", &linchain_compose_cpu);
  m.impl("linchain_compose_backward", &linchain_compose_backward_cpu);
}

}  // namespace finetune_ext
