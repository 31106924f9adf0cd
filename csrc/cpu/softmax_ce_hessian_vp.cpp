// CPU kernel of finetune_ext::softmax_ce_hessian_vp: rows split across threads; each row's probabilities are
// computed once into a thread-local buffer and applied to all m vectors.
#include "../softmax_ce_hessian_vp.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace finetune_ext {
namespace {

// sum_j a[j] * b[j] with kLanes independent partial sums (vectorisable without -ffast-math), each lane block
// of 1024 terms folded into a double: the error stays that of a short float sum.
template <typename acc_t, typename vec_t>
double dot(const acc_t* a, const vec_t* b, int64_t c) {
  constexpr int kLanes = 8;
  double total = 0;
  for (int64_t start = 0; start < c; start += 1024) {
    const int64_t end = std::min<int64_t>(c, start + 1024);
    acc_t lanes[kLanes] = {};
    int64_t j = start;
    for (; j + kLanes <= end; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * static_cast<acc_t>(b[j + l]);
    }
    for (; j < end; ++j) lanes[0] += a[j] * static_cast<acc_t>(b[j]);
    for (int l = 0; l < kLanes; ++l) total += lanes[l];
  }
  return total;
}

template <typename logit_t, typename vec_t>
void hessian_vp_cpu_impl(const logit_t* z, const vec_t* v, const int64_t* labels, int64_t ignore_index,
                         const void* scale, vec_t* out, int64_t m, int64_t n, int64_t c) {
  using acc_t = std::conditional_t<std::is_same_v<vec_t, double>, double, float>;
  const acc_t s = scale != nullptr ? *static_cast<const acc_t*>(scale) : acc_t(1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> p(c);
    for (int64_t row = begin; row < end; ++row) {
      const bool ignored = labels != nullptr && labels[row] == ignore_index;
      if (!ignored) {
        const logit_t* zr = z + row * c;
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < c; ++j) mx = std::max(mx, static_cast<acc_t>(zr[j]));
        double sum = 0;  // row sums in double: a sequential fp32 sum over 50k classes loses digits
        for (int64_t j = 0; j < c; ++j) sum += (p[j] = std::exp(static_cast<acc_t>(zr[j]) - mx));
        const acc_t inv = static_cast<acc_t>(1.0 / sum);
        for (int64_t j = 0; j < c; ++j) p[j] *= inv;
      }
      for (int64_t k = 0; k < m; ++k) {
        const vec_t* vr = v + (k * n + row) * c;
        vec_t* orow = out + (k * n + row) * c;
        if (ignored) {
          std::fill(orow, orow + c, vec_t(0));
          continue;
        }
        const acc_t d = static_cast<acc_t>(dot(p.data(), vr, c));
        for (int64_t j = 0; j < c; ++j) orow[j] = static_cast<vec_t>(p[j] * (static_cast<acc_t>(vr[j]) - d) * s);
      }
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
