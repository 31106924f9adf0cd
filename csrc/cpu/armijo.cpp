// CPU kernels of finetune_ext::armijo_moments_ and finetune_ext::armijo_update_: the tensor list cut into
// fixed chunks (armijo.h) spread over threads; per-chunk partial sums in double, added per block in list
// order so the result does not depend on the thread count.
#include "../armijo.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace finetune_ext {
namespace {

at::Tensor armijo_moments_cpu(at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                              at::IntArrayRef block_of, int64_t num_blocks, double beta1, double beta2, double bc2,
                              double eps, bool adam) {
  check_armijo_moments_args(grads, exp_avg, exp_avg_sq, block_of, num_blocks, adam, c10::DeviceType::CPU);
  const std::vector<ArmijoChunk> chunks = armijo_chunks(grads);
  std::vector<double> partial(2 * chunks.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "armijo_moments_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ArmijoConsts<acc_t> k(beta1, beta2, 1.0, bc2, eps);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t i = chunks[c].tensor, s = chunks[c].start;
        const int64_t n = std::min(kArmijoChunk, grads[i].numel() - s);
        const scalar_t* g = grads[i].const_data_ptr<scalar_t>() + s;
        scalar_t* m = adam ? exp_avg[i].mutable_data_ptr<scalar_t>() + s : nullptr;
        scalar_t* v = adam ? exp_avg_sq[i].mutable_data_ptr<scalar_t>() + s : nullptr;
        double sum_p = 0, sum_g = 0;
        for (int64_t j = 0; j < n; ++j) {
          armijo_moment_element(g[j], adam ? m + j : nullptr, adam ? v + j : nullptr, k, adam, sum_p, sum_g);
        }
        partial[2 * c] = sum_p;
        partial[2 * c + 1] = sum_g;
      }
    });
  });
  at::Tensor out = at::zeros({num_blocks, 2}, grads[0].options().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) {
    const int64_t b = block_of[chunks[c].tensor];
    o[2 * b] += partial[2 * c];
    o[2 * b + 1] += partial[2 * c + 1];
  }
  return out;
}

// One chunk with the mode as template arguments, so the element loop has no branches and vectorises.
template <bool kAdam, bool kUseM, typename scalar_t, typename acc_t>
void armijo_update_chunk(scalar_t* w, const scalar_t* g, const scalar_t* m, const scalar_t* v, int64_t n, acc_t ag,
                         acc_t am, const ArmijoConsts<acc_t>& k) {
  for (int64_t j = 0; j < n; ++j) {
    armijo_update_element(w + j, g[j], kUseM ? m + j : nullptr, kAdam ? v + j : nullptr, ag, am, k, kAdam, kUseM);
  }
}

void armijo_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                       at::ArrayRef<double> alpha_g, at::ArrayRef<double> alpha_m, double bc1, double bc2, double eps,
                       bool adam) {
  check_armijo_update_args(params, grads, exp_avg, exp_avg_sq, alpha_g, alpha_m, adam, c10::DeviceType::CPU);
  const std::vector<ArmijoChunk> chunks = armijo_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "armijo_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ArmijoConsts<acc_t> k(0.0, 0.0, bc1, bc2, eps);
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t i = chunks[c].tensor, s = chunks[c].start;
        const int64_t n = std::min(kArmijoChunk, params[i].numel() - s);
        const acc_t ag = alpha_g[i], am = alpha_m[i];
        scalar_t* w = params[i].mutable_data_ptr<scalar_t>() + s;
        const scalar_t* g = grads[i].const_data_ptr<scalar_t>() + s;
        if (!adam) {
          armijo_update_chunk<false, false, scalar_t, acc_t>(w, g, nullptr, nullptr, n, ag, am, k);
          continue;
        }
        const scalar_t* v = exp_avg_sq[i].const_data_ptr<scalar_t>() + s;
        if (alpha_m[i] == 0.0) {  // trials do not read m
          armijo_update_chunk<true, false, scalar_t, acc_t>(w, g, nullptr, v, n, ag, am, k);
        } else {
          armijo_update_chunk<true, true, scalar_t, acc_t>(w, g, exp_avg[i].const_data_ptr<scalar_t>() + s, v, n, ag,
                                                           am, k);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CPU, m) {
  m.impl("armijo_moments_", &armijo_moments_cpu);
  m.impl("armijo_update_", &armijo_update_cpu);
}

}  // namespace finetune_ext
