// CPU kernel of finetune_ext::softmax_ce_hessian_vp: (row, vector) pairs split across threads; each row's
// probabilities are computed into a thread-local buffer and applied to the row's vectors of the thread's share.
#include "../softmax_ce_hessian_vp.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace finetune_ext {
namespace {

// sum_j term(j): blocks of 1024 terms summed in acc_t by an OpenMP simd reduction (vectorised without
// -ffast-math), the blocks added in double, so the error stays that of a short float sum.
template <typename acc_t, typename Term>
[[gnu::always_inline]] inline double block_sum(int64_t c, Term term) {
  double total = 0;
  for (int64_t start = 0; start < c; start += 1024) {
    const int64_t end = std::min<int64_t>(c, start + 1024);
    acc_t block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t j = start; j < end; ++j) block += term(j);
    total += block;
  }
  return total;
}

// Copies a row of logits into p (the accumulation type) and returns its maximum, with kLanes independent maxima so
// that the loop vectorises. A NaN logit is skipped here, as std::max skips it, and makes its exp NaN.
template <typename logit_t, typename acc_t>
acc_t copy_max(const logit_t* z, acc_t* p, int64_t c) {
  constexpr int kLanes = 8;
  acc_t lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<acc_t>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= c; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], p[j + l] = static_cast<acc_t>(z[j + l]));
  }
  for (; j < c; ++j) lanes[0] = std::max(lanes[0], p[j] = static_cast<acc_t>(z[j]));
  return *std::max_element(lanes, lanes + kLanes);
}

// exp(x) for the x <= 0 of a max-shifted row, branch-free so that the loop vectorises (std::exp does not):
// x = k ln2 + r with |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial (relative error below 1e-8), 2^k from
// the exponent bits. Below -87, where exp(x) is subnormal, and at -inf it gives 0; NaN stays NaN.
inline float exp_nonpositive(float x) {
  const float clamped = x > -87.0f ? x : -87.0f;  // keeps k a normal exponent; NaN goes on through r
  const float k = std::nearbyint(clamped * 1.44269504f);
  const float r = (x - k * 0.693145751953125f) - k * 1.42860677e-6f;  // ln 2 in two parts: k * hi is exact
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

// p[j] = exp(p[j] - shift) over a row.
__attribute__((target_clones("avx512f", "avx2", "default"))) void exp_shifted(float* p, int64_t c, float shift) {
  for (int64_t j = 0; j < c; ++j) p[j] = exp_nonpositive(p[j] - shift);
}

void exp_shifted(double* p, int64_t c, double shift) {
  for (int64_t j = 0; j < c; ++j) p[j] = std::exp(p[j] - shift);
}

// p = softmax(z) over one row, in the accumulation type.
template <typename logit_t, typename acc_t>
__attribute__((target_clones("avx512f", "avx2", "default"))) void softmax_row(const logit_t* z, acc_t* p, int64_t c) {
  exp_shifted(p, c, copy_max(z, p, c));
  const acc_t inv = static_cast<acc_t>(1.0 / block_sum<acc_t>(c, [&](int64_t j) { return p[j]; }));
  for (int64_t j = 0; j < c; ++j) p[j] *= inv;
}

// out = s p (v - <p, v>) over one row.
template <typename acc_t, typename vec_t>
__attribute__((target_clones("avx512f", "avx2", "default"))) void hessian_vp_row(const acc_t* p, const vec_t* v,
                                                                                 vec_t* out, int64_t c, acc_t s) {
  const acc_t d = static_cast<acc_t>(block_sum<acc_t>(c, [&](int64_t j) { return p[j] * static_cast<acc_t>(v[j]); }));
  for (int64_t j = 0; j < c; ++j) out[j] = static_cast<vec_t>(p[j] * (static_cast<acc_t>(v[j]) - d) * s);
}

// Threads split the (row, vector) pairs in row-major order, so a handful of vectors (m = 8 over one row) still
// use every core; a thread computes a row's probabilities when it reaches the row's first pair of its share.
template <typename logit_t, typename vec_t>
void hessian_vp_cpu_impl(const logit_t* z, const vec_t* v, const int64_t* labels, int64_t ignore_index,
                         const void* scale, vec_t* out, int64_t m, int64_t n, int64_t c) {
  using acc_t = std::conditional_t<std::is_same_v<vec_t, double>, double, float>;
  const acc_t s = scale != nullptr ? *static_cast<const acc_t*>(scale) : acc_t(1);
  at::parallel_for(0, n * m, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(c);
    int64_t p_row = -1;
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t row = pair / m, k = pair % m;
      const vec_t* vr = v + (k * n + row) * c;
      vec_t* orow = out + (k * n + row) * c;
      if (labels != nullptr && labels[row] == ignore_index) {
        std::fill(orow, orow + c, vec_t(0));
        continue;
      }
      if (row != p_row) {
        softmax_row(z + row * c, p.data(), c);
        p_row = row;
      }
      hessian_vp_row(p.data(), vr, orow, c, s);
    }
  });
}

at::Tensor softmax_ce_hessian_vp_cpu(const at::Tensor& logits, const at::Tensor& V,
                                     const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                     const std::optional<at::Tensor>& scale) {
  const HessianVpTensors t = prepare_softmax_ce_hessian_vp(logits, V, labels, scale, c10::DeviceType::CPU);
  const at::Tensor &z = t.logits, &v = t.V, &lab = t.labels, &out = t.out;
  const int64_t m = V.size(0), n = V.size(1), c = V.size(2);
  if (out.numel() == 0) return out;
  const int64_t* lp = lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr;
  const void* sp = t.scale.defined() ? t.scale.const_data_ptr() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "softmax_ce_hessian_vp_cpu", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "softmax_ce_hessian_vp_cpu_v", [&] {
      hessian_vp_cpu_impl<logit_t, scalar_t>(z.const_data_ptr<logit_t>(), v.const_data_ptr<scalar_t>(), lp,
                                             ignore_index, sp, out.mutable_data_ptr<scalar_t>(), m, n, c);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CPU, m) { m.impl("softmax_ce_hessian_vp", &softmax_ce_hessian_vp_cpu); }

}  // namespace finetune_ext
