// Shared by the CPU and CUDA kernels of finetune_ext::armijo_moments_ and finetune_ext::armijo_update_:
// argument checks, the chunking of a tensor list, and the per-element rules.
//
// Both ops walk a list of tensors (a model's parameters, or one block of them) as fixed-size chunks, so one
// launch covers every tensor. Per element, with P = 1 / (sqrt(v / bc2) + eps) (Adam) or 1 (SGD):
//   moments:  m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2,  then sums of g^2 P and g^2 per block
//   update:   w <- w + (alpha_g g + alpha_m m / bc1) P
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/host_device.h"

namespace finetune_ext {

constexpr int64_t kArmijoChunk = 1 << 16;

struct ArmijoChunk {
  int64_t tensor;  // index into the lists
  int64_t start;   // first element of the chunk
};

// The chunks of `tensors`, in list order (so per-block partial sums can be added in a fixed order).
inline std::vector<ArmijoChunk> armijo_chunks(at::TensorList tensors) {
  std::vector<ArmijoChunk> chunks;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    for (int64_t s = 0; s < tensors[i].numel(); s += kArmijoChunk) chunks.push_back({i, s});
  }
  return chunks;
}

inline void check_armijo_list(const char* op, const char* name, at::TensorList list, at::TensorList like,
                              c10::DeviceType device_type) {
  TORCH_CHECK(list.size() == like.size(), op, ": expected ", like.size(), " tensors in ", name, ", got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].device().type() == device_type && list[i].device() == like[0].device(), op, ": expected ", name,
                "[", i, "] on ", like[0].device(), ", got ", list[i].device());
    TORCH_CHECK(list[i].sizes() == like[i].sizes(), op, ": expected ", name, "[", i, "] of shape ", like[i].sizes(),
                ", got ", list[i].sizes());
    TORCH_CHECK(list[i].scalar_type() == like[0].scalar_type(), op, ": expected ", name, "[", i, "] of dtype ",
                like[0].scalar_type(), " (one dtype per call), got ", list[i].scalar_type());
    TORCH_CHECK(list[i].is_contiguous(), op, ": expected ", name, "[", i, "] to be contiguous");
  }
}

inline void check_armijo_moments_args(at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                                      at::IntArrayRef block_of, int64_t num_blocks, bool adam,
                                      c10::DeviceType device_type) {
  const char* op = "armijo_moments_";
  TORCH_CHECK(!grads.empty(), op, ": expected at least one gradient");
  check_armijo_list(op, "grads", grads, grads, device_type);
  const auto st = grads[0].scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": expected float32, float64, float16 or bfloat16 tensors, got ", st);
  if (adam) {
    check_armijo_list(op, "exp_avg", exp_avg, grads, device_type);
    check_armijo_list(op, "exp_avg_sq", exp_avg_sq, grads, device_type);
  }
  TORCH_CHECK(block_of.size() == grads.size(), op, ": expected block_of with one entry per tensor (", grads.size(),
              "), got ", block_of.size());
  for (size_t i = 0; i < block_of.size(); ++i) {
    TORCH_CHECK(block_of[i] >= 0 && block_of[i] < num_blocks, op, ": block_of[", i, "] = ", block_of[i],
                " is outside [0, ", num_blocks, ")");
  }
}

inline void check_armijo_update_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                                     at::TensorList exp_avg_sq, at::ArrayRef<double> alpha_g,
                                     at::ArrayRef<double> alpha_m, bool adam, c10::DeviceType device_type) {
  const char* op = "armijo_update_";
  TORCH_CHECK(!params.empty(), op, ": expected at least one parameter");
  check_armijo_list(op, "params", params, params, device_type);
  check_armijo_list(op, "grads", grads, params, device_type);
  if (adam) {
    check_armijo_list(op, "exp_avg", exp_avg, params, device_type);
    check_armijo_list(op, "exp_avg_sq", exp_avg_sq, params, device_type);
  }
  TORCH_CHECK(alpha_g.size() == params.size() && alpha_m.size() == params.size(), op,
              ": expected alpha_g and alpha_m with one entry per tensor (", params.size(), "), got ", alpha_g.size(),
              " and ", alpha_m.size());
}

// P = 1 / (sqrt(v / bc2) + eps): Adam's preconditioner with the bias correction of the second moment, in acc_t on
// every backend (std::sqrt: an unqualified sqrt of a float can resolve to the double one on the host only).
template <typename acc_t>
FTX_HOST_DEVICE acc_t armijo_precond(acc_t v, acc_t bc2, acc_t eps) {
  return acc_t(1) / (std::sqrt(v / bc2) + eps);
}

// Adam's constants, 1 - beta computed in double first: 1 - 0.999f is off by 1e-5 relative.
template <typename acc_t>
struct ArmijoConsts {
  acc_t b1, ob1, b2, ob2, c1, c2, eps;
  FTX_HOST_DEVICE ArmijoConsts(double beta1, double beta2, double bc1, double bc2, double e)
      : b1(beta1), ob1(1.0 - beta1), b2(beta2), ob2(1.0 - beta2), c1(bc1), c2(bc2), eps(e) {}
};

// One element of armijo_moments_: m, v updated in place (Adam); adds g^2 P and g^2 to the running sums.
template <typename scalar_t, typename acc_t, typename sum_t>
FTX_HOST_DEVICE void armijo_moment_element(scalar_t g_in, scalar_t* m, scalar_t* v, const ArmijoConsts<acc_t>& k,
                                           bool adam, sum_t& sum_p, sum_t& sum_g) {
  const acc_t g = static_cast<acc_t>(g_in);
  const acc_t g2 = g * g;
  acc_t p = 1;
  if (adam) {
    // mul_add_rn: no FMA contraction on the GPU, so m, v and P are the CPU kernel's bits and so are the sums.
    *m = static_cast<scalar_t>(mul_add_rn<acc_t>(k.b1 * static_cast<acc_t>(*m), k.ob1, g));
    *v = static_cast<scalar_t>(mul_add_rn<acc_t>(k.b2 * static_cast<acc_t>(*v), k.ob2, g2));
    p = armijo_precond<acc_t>(static_cast<acc_t>(*v), k.c2, k.eps);
  }
  sum_p += static_cast<sum_t>(g2 * p);
  sum_g += static_cast<sum_t>(g2);
}

// One element of armijo_update_: w += (ag g + am m / bc1) P; trials (use_m false) do not read m.
template <typename scalar_t, typename acc_t>
FTX_HOST_DEVICE void armijo_update_element(scalar_t* w, scalar_t g, const scalar_t* m, const scalar_t* v, acc_t ag,
                                           acc_t am, const ArmijoConsts<acc_t>& k, bool adam, bool use_m) {
  acc_t d = ag * static_cast<acc_t>(g);
  if (adam) {
    if (use_m) d = mul_add_rn<acc_t>(d, am, static_cast<acc_t>(*m) / k.c1);
    d *= armijo_precond<acc_t>(static_cast<acc_t>(*v), k.c2, k.eps);
  }
  *w = static_cast<scalar_t>(static_cast<acc_t>(*w) + d);
}

}  // namespace finetune_ext
