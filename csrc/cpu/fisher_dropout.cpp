// CPU kernel of finetune_ext::fisher_dropout: one Philox call per group of eight elements, groups split
// across threads with at::parallel_for. Masks are bit-identical to the CUDA kernel and to
// finetune_ext/reference/fisher_dropout.py for the same (seed, offset).
#include "../fisher_dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "philox_block.h"

namespace finetune_ext {
namespace {

// GCC and Clang macros: some torch releases build extensions as C++17, whose library has no endianness test.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "fisher_dropout_cpu reads a word's 16-bit halves in place");

// Elements [0, run) of one stretch that does not cross a feature row: keep[k] per element (per_feature) or
// keep[0]. Branch-free, so the compiler vectorises it; compiled for AVX-512, AVX2 and the baseline.
template <typename scalar_t, bool per_feature, bool with_residual>
__attribute__((target_clones("avx512f", "avx2", "default"))) void dropout_run(const scalar_t* x, const float* keep,
                                                                              const scalar_t* residual, const float* u,
                                                                              scalar_t* y, int64_t run) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = 0; k < run; ++k) {
    acc_t v = dropout_value<acc_t>(static_cast<acc_t>(x[k]), keep[per_feature ? k : 0], u[k]);
    if constexpr (with_residual) v = static_cast<acc_t>(residual[k]) + v;
    y[k] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, bool per_feature, bool with_residual>
void fisher_dropout_cpu_impl(const scalar_t* x, const float* keep, const scalar_t* residual, scalar_t* y, int64_t n,
                             int64_t d, PhiloxSeed s) {
  constexpr int64_t kElems = 8 * kPhiloxBlock;
  const int64_t blocks = (n + kElems - 1) / kElems;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    uint32_t words[kElems / 2];
    uint16_t halves[kElems];
    float u[kElems];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kElems;
      const int64_t count = std::min<int64_t>(kElems, n - first);
      philox_block(s.seed, s.offset, b * kPhiloxBlock, (count + 7) / 8, words);
      std::memcpy(halves, words, sizeof(halves));  // half i % 2 of word i / 2 (little-endian), as philox_uniform
      for (int64_t i = 0; i < count; ++i) u[i] = static_cast<float>(halves[i]) * (1.0f / 65536.0f);
      for (int64_t e = 0; e < count;) {
        const int64_t f = per_feature ? (first + e) % d : 0;
        const int64_t run = per_feature ? std::min<int64_t>(count - e, d - f) : count - e;
        const int64_t idx = first + e;
        dropout_run<scalar_t, per_feature, with_residual>(x + idx, keep + f, with_residual ? residual + idx : nullptr,
                                                          u + e, y + idx, run);
        e += run;
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
    using Impl = void (*)(const scalar_t*, const float*, const scalar_t*, scalar_t*, int64_t, int64_t, PhiloxSeed);
    const Impl impl = per_feature ? (r_c.defined() ? &fisher_dropout_cpu_impl<scalar_t, true, true>
                                                   : &fisher_dropout_cpu_impl<scalar_t, true, false>)
                                  : (r_c.defined() ? &fisher_dropout_cpu_impl<scalar_t, false, true>
                                                   : &fisher_dropout_cpu_impl<scalar_t, false, false>);
    impl(x_c.const_data_ptr<scalar_t>(), kp, r_c.defined() ? r_c.const_data_ptr<scalar_t>() : nullptr,
         y.mutable_data_ptr<scalar_t>(), x.numel(), d, s);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CPU, m) { m.impl("fisher_dropout", &fisher_dropout_cpu); }

}  // namespace finetune_ext
