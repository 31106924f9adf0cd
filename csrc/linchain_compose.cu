// CUDA kernels of finetune_ext::linchain_compose and its backward: every chain of the model in one launch,
// one block per chain running the shared per-chain code of linchain_compose.h (entries of each r x r product
// split across the block's threads, __syncthreads between the chain's steps). The chains are tiny (k r^3
// flops), so the point is one launch for all adapters instead of k small matmuls per adapter.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "linchain_compose.h"

namespace finetune_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) _linchain_compose_kernel(const scalar_t* W, const scalar_t* b, scalar_t* M,
                                                                     scalar_t* beff, acc_t* ws, int64_t k, int64_t r) {
  const int64_t j = blockIdx.x;
  compose_chain<scalar_t, acc_t>(W + j * k * r * r, b != nullptr ? b + j * k * r : nullptr, M + j * r * r, beff + j * r,
                                 ws + j * linchain_workspace(k, r), k, r, threadIdx.x, blockDim.x, BlockSync{});
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    _linchain_compose_backward_kernel(const scalar_t* W, const scalar_t* b, const scalar_t* gM, const scalar_t* gbeff,
                                      scalar_t* gW, scalar_t* gb, acc_t* ws, int64_t k, int64_t r) {
  const int64_t j = blockIdx.x;
  compose_chain_backward<scalar_t, acc_t>(W + j * k * r * r, b != nullptr ? b + j * k * r : nullptr, gM + j * r * r,
                                          gbeff + j * r, gW + j * k * r * r, gb != nullptr ? gb + j * k * r : nullptr,
                                          ws + j * linchain_workspace(k, r), k, r, threadIdx.x, blockDim.x,
                                          BlockSync{});
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> linchain_compose_cuda(const at::Tensor& W, const std::optional<at::Tensor>& b) {
  const LinchainTensors t = prepare_linchain_compose(W, b, c10::DeviceType::CUDA);
  const at::Tensor &w = t.w, &bias = t.bias, &M = t.M, &beff = t.beff;
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t n = W.size(0), k = W.size(1), r = W.size(2);
  if (n == 0) return {M, beff};
  at::Tensor ws = at::empty({n * linchain_workspace(k, r)}, W.options().dtype(acc_type(W.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "linchain_compose_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    _linchain_compose_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        M.mutable_data_ptr<scalar_t>(), beff.mutable_data_ptr<scalar_t>(), ws.mutable_data_ptr<acc_t>(), k, r);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {M, beff};
}

std::tuple<at::Tensor, at::Tensor> linchain_compose_backward_cuda(const at::Tensor& grad_M, const at::Tensor& grad_beff,
                                                                  const at::Tensor& W,
                                                                  const std::optional<at::Tensor>& b) {
  const LinchainBackwardTensors t = prepare_linchain_compose_backward(grad_M, grad_beff, W, b, c10::DeviceType::CUDA);
  const at::Tensor &w = t.w, &bias = t.bias, &gm = t.gM, &ge = t.gbeff, &gW = t.gW, &gb = t.gb;
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t n = W.size(0), k = W.size(1), r = W.size(2);
  if (n == 0) return {gW, gb};
  at::Tensor ws = at::empty({n * linchain_workspace(k, r)}, W.options().dtype(acc_type(W.scalar_type())));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "linchain_compose_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    _linchain_compose_backward_kernel<scalar_t, acc_t><<<n, kThreads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        gm.const_data_ptr<scalar_t>(), ge.const_data_ptr<scalar_t>(), gW.mutable_data_ptr<scalar_t>(),
        bias.defined() ? gb.mutable_data_ptr<scalar_t>() : nullptr, ws.mutable_data_ptr<acc_t>(), k, r);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gW, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CUDA, m) {
  m.impl("linchain_compose", &linchain_compose_cuda);
  m.impl("linchain_compose_backward", &linchain_compose_backward_cuda);
}

}  // namespace finetune_ext
