// CPU kernel of finetune_ext::fisher_dropout: one Philox call per group of four elements, groups split
// across threads with at::parallel_for. Masks are bit-identical to the CUDA kernel and to
// finetune_ext/reference/fisher_dropout.py for the same (seed, offset).
#include "../fisher_dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

namespace finetune_ext {
namespace {

// Groups are processed in blocks of kBlock so that the Philox rounds run over arrays (structure of
// arrays), which the compiler vectorises; the per-feature index advances without a division per element.
constexpr int64_t kBlock = 64;

void philox_block(PhiloxSeed s, int64_t first_group, int64_t count, float* u) {
  uint32_t c0[kBlock], c1[kBlock], c2[kBlock], c3[kBlock];
  for (int64_t j = 0; j < count; ++j) {
    const uint64_t g = static_cast<uint64_t>(first_group + j);
    c0[j] = static_cast<uint32_t>(g);
    c1[j] = static_cast<uint32_t>(g >> 32);
    c2[j] = static_cast<uint32_t>(s.offset);
    c3[j] = static_cast<uint32_t>(s.offset >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(s.seed), k1 = static_cast<uint32_t>(s.seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t j = 0; j < count; ++j) philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  for (int64_t j = 0; j < count; ++j) {
    u[4 * j] = philox_uniform(c0[j]);
    u[4 * j + 1] = philox_uniform(c1[j]);
    u[4 * j + 2] = philox_uniform(c2[j]);
    u[4 * j + 3] = philox_uniform(c3[j]);
  }
}

template <typename scalar_t>
void fisher_dropout_cpu_impl(const scalar_t* x, const float* keep, const scalar_t* residual, scalar_t* y, int64_t n,
                             int64_t d, bool per_feature, PhiloxSeed s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blocks = (n + 4 * kBlock - 1) / (4 * kBlock);
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float u[4 * kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * 4 * kBlock;
      const int64_t count = std::min<int64_t>(4 * kBlock, n - first);
      philox_block(s, b * kBlock, (count + 3) / 4, u);
      int64_t f = per_feature ? first % d : 0;
      for (int64_t i = 0; i < count; ++i) {
        const int64_t idx = first + i;
        acc_t v = dropout_value<acc_t>(static_cast<acc_t>(x[idx]), keep[f], u[i]);
        if (per_feature && ++f == d) f = 0;
        if (residual != nullptr) {
          v = static_cast<acc_t>(residual[idx]) + v;
        }
        y[idx] = static_cast<scalar_t>(v);
      }
    }
  });
}

at::Tensor fisher_dropout_cpu(const at::Tensor& x, const at::Tensor& keep, const std::optional<at::Tensor>& residual,
                              const at::Tensor& seed) {
  const PhiloxSeed s = check_fisher_dropout_args(x, keep, residual, seed, c10::DeviceType::CPU);
  const at::Tensor keep_c = keep.contiguous();
  const float* kp = keep_c.const_data_ptr<float>();
  for (int64_t i = 0; i < keep_c.numel(); ++i) {
    TORCH_CHECK(kp[i] > 0.0f && kp[i] <= 1.0f, "fisher_dropout: expected every keep probability in (0, 1], got ", kp[i],
                " at index ", i);
  }
  const at::Tensor x_c = x.contiguous();
  const at::Tensor r_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t d = x.dim() == 0 ? 1 : x.size(-1);
  const bool per_feature = keep_c.numel() != 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fisher_dropout_cpu", [&] {
    fisher_dropout_cpu_impl<scalar_t>(x_c.const_data_ptr<scalar_t>(), kp,
                                      r_c.defined() ? r_c.const_data_ptr<scalar_t>() : nullptr,
                                      y.mutable_data_ptr<scalar_t>(), x.numel(), d, per_feature, s);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CPU, m) { m.impl("fisher_dropout", &fisher_dropout_cpu); }

}  // namespace finetune_ext
