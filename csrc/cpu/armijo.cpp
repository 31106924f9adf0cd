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
    // 1 - beta in double first: 1 - 0.999f is off by 1e-5 relative.
    const acc_t b1 = beta1, b2 = beta2, c2 = bc2, ep = eps, ob1 = 1.0 - beta1, ob2 = 1.0 - beta2;
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t i = chunks[c].tensor, s = chunks[c].start;
        const int64_t n = std::min(kArmijoChunk, grads[i].numel() - s);
        const scalar_t* g = grads[i].const_data_ptr<scalar_t>() + s;
        scalar_t* m = adam ? exp_avg[i].mutable_data_ptr<scalar_t>() + s : nullptr;
        scalar_t* v = adam ? exp_avg_sq[i].mutable_data_ptr<scalar_t>() + s : nullptr;
        double sum_p = 0, sum_g = 0;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t gj = static_cast<acc_t>(g[j]);
          const acc_t g2 = gj * gj;
          acc_t p = 1;
          if (adam) {
            const acc_t mj = b1 * static_cast<acc_t>(m[j]) + ob1 * gj;
            const acc_t vj = b2 * static_cast<acc_t>(v[j]) + ob2 * g2;
            m[j] = static_cast<scalar_t>(mj);
            v[j] = static_cast<scalar_t>(vj);
            p = armijo_precond<acc_t>(static_cast<acc_t>(v[j]), c2, ep);
          }
          sum_p += static_cast<double>(g2 * p);
          sum_g += static_cast<double>(g2);
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

void armijo_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                       at::ArrayRef<double> alpha_g, at::ArrayRef<double> alpha_m, double bc1, double bc2, double eps,
                       bool adam) {
  check_armijo_update_args(params, grads, exp_avg, exp_avg_sq, alpha_g, alpha_m, adam, c10::DeviceType::CPU);
  const std::vector<ArmijoChunk> chunks = armijo_chunks(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "armijo_update_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t c1 = bc1, c2 = bc2, ep = eps;
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t i = chunks[c].tensor, s = chunks[c].start;
        const int64_t n = std::min(kArmijoChunk, params[i].numel() - s);
        const acc_t ag = alpha_g[i], am = alpha_m[i];
        scalar_t* w = params[i].mutable_data_ptr<scalar_t>() + s;
        const scalar_t* g = grads[i].const_data_ptr<scalar_t>() + s;
        const bool use_m = adam && alpha_m[i] != 0.0;
        const scalar_t* m = use_m ? exp_avg[i].const_data_ptr<scalar_t>() + s : nullptr;
        const scalar_t* v = adam ? exp_avg_sq[i].const_data_ptr<scalar_t>() + s : nullptr;
        for (int64_t j = 0; j < n; ++j) {
          acc_t d = ag * static_cast<acc_t>(g[j]);
          if (adam) {
            if (use_m) d += am * (static_cast<acc_t>(m[j]) / c1);  // trials skip m: one read less
            d *= armijo_precond<acc_t>(static_cast<acc_t>(v[j]), c2, ep);
          }
          w[j] = static_cast<scalar_t>(static_cast<acc_t>(w[j]) + d);
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
