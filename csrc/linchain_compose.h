// Shared by the CPU and CUDA kernels of finetune_ext::linchain_compose(_backward): argument checks and the
// per-chain math. One chain is W_0, ..., W_{k-1} (r x r, row-major) and optional biases b_0, ..., b_{k-1}:
//   M = W_{k-1} ... W_0,   beff = c_{k-1},  c_i = W_i c_{i-1} + b_i,  c_{-1} = 0.
// The same code runs on one CPU thread (tid 0, one "thread", no-op sync) and on one CUDA block (tid =
// threadIdx.x, __syncthreads), so both backends compute identical sums in identical order, and every
// multiply-add goes through mul_add_rn (no FMA contraction on the GPU), so identical bits.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common/host_device.h"

namespace finetune_ext {

inline void check_linchain_compose_args(const at::Tensor& W, const std::optional<at::Tensor>& b,
                                        c10::DeviceType device_type) {
  TORCH_CHECK(W.device().type() == device_type, "linchain_compose: expected W on ", device_type, ", got ", W.device());
  TORCH_CHECK(W.dim() == 4 && W.size(2) == W.size(3) && W.size(1) >= 1 && W.size(2) >= 1,
              "linchain_compose: expected W of shape [N, k, r, r] with k, r >= 1, got ", W.sizes());
  const auto st = W.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "linchain_compose: expected W float32, float64, float16 or bfloat16, got ", st);
  if (b.has_value()) {
    TORCH_CHECK(b->dim() == 3 && b->size(0) == W.size(0) && b->size(1) == W.size(1) && b->size(2) == W.size(2),
                "linchain_compose: expected b of shape [", W.size(0), ", ", W.size(1), ", ", W.size(2), "], got ",
                b->sizes());
    TORCH_CHECK(b->scalar_type() == st && b->device() == W.device(), "linchain_compose: expected b of dtype ", st,
                " on ", W.device(), ", got ", b->scalar_type(), " on ", b->device());
  }
}

inline void check_linchain_compose_backward_args(const at::Tensor& grad_M, const at::Tensor& grad_beff,
                                                 const at::Tensor& W, const std::optional<at::Tensor>& b,
                                                 c10::DeviceType device_type) {
  check_linchain_compose_args(W, b, device_type);
  const int64_t n = W.size(0), r = W.size(2);
  TORCH_CHECK(grad_M.sizes() == at::IntArrayRef({n, r, r}) && grad_beff.sizes() == at::IntArrayRef({n, r}),
              "linchain_compose_backward: gradient shapes ", grad_M.sizes(), " and ", grad_beff.sizes(),
              " do not match W ", W.sizes());
  TORCH_CHECK(grad_M.device() == W.device() && grad_beff.device() == W.device(),
              "linchain_compose_backward: expected gradients on ", W.device());
}

// What both backends launch on, after the argument checks: contiguous inputs (bias undefined without b) and
// uninitialised outputs of W's dtype.
struct LinchainTensors {
  at::Tensor w, bias, M, beff;
};

inline LinchainTensors prepare_linchain_compose(const at::Tensor& W, const std::optional<at::Tensor>& b,
                                                c10::DeviceType device_type) {
  check_linchain_compose_args(W, b, device_type);
  const int64_t n = W.size(0), r = W.size(2);
  return {W.contiguous(), b.has_value() ? b->contiguous() : at::Tensor(), at::empty({n, r, r}, W.options()),
          at::empty({n, r}, W.options())};
}

// The same for the backward; gb is empty without b. The incoming gradients are cast to W's dtype.
struct LinchainBackwardTensors {
  at::Tensor w, bias, gM, gbeff, gW, gb;
};

inline LinchainBackwardTensors prepare_linchain_compose_backward(const at::Tensor& grad_M, const at::Tensor& grad_beff,
                                                                 const at::Tensor& W,
                                                                 const std::optional<at::Tensor>& b,
                                                                 c10::DeviceType device_type) {
  check_linchain_compose_backward_args(grad_M, grad_beff, W, b, device_type);
  return {W.contiguous(),
          b.has_value() ? b->contiguous() : at::Tensor(),
          grad_M.to(W.scalar_type()).contiguous(),
          grad_beff.to(W.scalar_type()).contiguous(),
          at::empty(W.sizes(), W.options()),
          b.has_value() ? at::empty(b->sizes(), W.options()) : at::empty({0}, W.options())};
}

// Accumulator elements one chain needs: prefix products and offsets P_0..P_{k-2}, c_0..c_{k-2}, plus two
// ping-pong buffers (r*r + r each) for the running product / adjoint.
FTX_HOST_DEVICE int64_t linchain_workspace(int64_t k, int64_t r) { return (k + 1) * (r * r + r); }

struct NoSync {
  FTX_HOST_DEVICE void operator()() const {}
};

struct BlockSync {
  FTX_HOST_DEVICE void operator()() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

// out = W_i @ P (matrix) and o = W_i @ c (+ b_i), entries split across threads.
template <typename scalar_t, typename acc_t>
FTX_HOST_DEVICE void chain_step(const scalar_t* Wi, const scalar_t* bi, const acc_t* P, const acc_t* c, acc_t* out,
                                acc_t* o, int64_t r, int64_t tid, int64_t nthreads) {
  for (int64_t e = tid; e < r * r; e += nthreads) {
    const int64_t row = e / r, col = e % r;
    acc_t s = 0;
    for (int64_t t = 0; t < r; ++t) s = mul_add_rn(s, static_cast<acc_t>(Wi[row * r + t]), P[t * r + col]);
    out[e] = s;
  }
  for (int64_t e = tid; e < r; e += nthreads) {
    acc_t s = bi != nullptr ? static_cast<acc_t>(bi[e]) : acc_t(0);
    for (int64_t t = 0; t < r; ++t) s = mul_add_rn(s, static_cast<acc_t>(Wi[e * r + t]), c[t]);
    o[e] = s;
  }
}

// Prefix products P_i and offsets c_i for i = 0..last into ws (P_i at i*(r*r+r), c_i right after it).
template <typename scalar_t, typename acc_t, typename Sync>
FTX_HOST_DEVICE void chain_prefix(const scalar_t* W, const scalar_t* b, acc_t* ws, int64_t last, int64_t r, int64_t tid,
                                  int64_t nthreads, Sync sync) {
  const int64_t rr = r * r, stride = rr + r;
  for (int64_t e = tid; e < rr; e += nthreads) ws[e] = static_cast<acc_t>(W[e]);
  for (int64_t e = tid; e < r; e += nthreads) ws[rr + e] = b != nullptr ? static_cast<acc_t>(b[e]) : acc_t(0);
  sync();
  for (int64_t i = 1; i <= last; ++i) {
    acc_t* prev = ws + (i - 1) * stride;
    acc_t* cur = ws + i * stride;
    chain_step(W + i * rr, b != nullptr ? b + i * r : nullptr, prev, prev + rr, cur, cur + rr, r, tid, nthreads);
    sync();
  }
}

template <typename scalar_t, typename acc_t, typename Sync>
FTX_HOST_DEVICE void compose_chain(const scalar_t* W, const scalar_t* b, scalar_t* M, scalar_t* beff, acc_t* ws,
                                   int64_t k, int64_t r, int64_t tid, int64_t nthreads, Sync sync) {
  const int64_t rr = r * r;
  chain_prefix(W, b, ws, k - 1, r, tid, nthreads, sync);
  const acc_t* last = ws + (k - 1) * (rr + r);
  for (int64_t e = tid; e < rr; e += nthreads) M[e] = static_cast<scalar_t>(last[e]);
  for (int64_t e = tid; e < r; e += nthreads) beff[e] = static_cast<scalar_t>(last[rr + e]);
}

// Reverse sweep: G_i = (W_{k-1}...W_{i+1})^T gM and g_i likewise for gbeff; then
//   gW_i = G_i P_{i-1}^T + g_i c_{i-1}^T  (P_{-1} = I, c_{-1} = 0),   gb_i = g_i.
template <typename scalar_t, typename acc_t, typename Sync>
FTX_HOST_DEVICE void compose_chain_backward(const scalar_t* W, const scalar_t* b, const scalar_t* gM,
                                            const scalar_t* gbeff, scalar_t* gW, scalar_t* gb, acc_t* ws, int64_t k,
                                            int64_t r, int64_t tid, int64_t nthreads, Sync sync) {
  const int64_t rr = r * r, stride = rr + r;
  if (k > 1) chain_prefix(W, b, ws, k - 2, r, tid, nthreads, sync);
  acc_t* G = ws + (k - 1) * stride;
  acc_t* H = G + stride;
  for (int64_t e = tid; e < rr; e += nthreads) G[e] = static_cast<acc_t>(gM[e]);
  for (int64_t e = tid; e < r; e += nthreads) G[rr + e] = static_cast<acc_t>(gbeff[e]);
  sync();
  for (int64_t i = k - 1; i >= 0; --i) {
    const acc_t* P = i > 0 ? ws + (i - 1) * stride : nullptr;
    const scalar_t* Wi = W + i * rr;
    for (int64_t e = tid; e < rr; e += nthreads) {
      const int64_t row = e / r, col = e % r;
      acc_t s;
      if (P == nullptr) {
        s = G[e];
      } else {
        s = G[rr + row] * P[rr + col];  // a lone product: nothing to contract
        for (int64_t t = 0; t < r; ++t) s = mul_add_rn(s, G[row * r + t], P[col * r + t]);
      }
      gW[i * rr + e] = static_cast<scalar_t>(s);
      if (i > 0) {
        acc_t h = 0;
        for (int64_t t = 0; t < r; ++t) h = mul_add_rn(h, static_cast<acc_t>(Wi[t * r + row]), G[t * r + col]);
        H[e] = h;
      }
    }
    for (int64_t e = tid; e < r; e += nthreads) {
      if (gb != nullptr) gb[i * r + e] = static_cast<scalar_t>(G[rr + e]);
      if (i > 0) {
        acc_t h = 0;
        for (int64_t t = 0; t < r; ++t) h = mul_add_rn(h, static_cast<acc_t>(Wi[t * r + e]), G[rr + t]);
        H[rr + e] = h;
      }
    }
    sync();
    acc_t* tmp = G;
    G = H;
    H = tmp;
  }
}

}  // namespace finetune_ext
