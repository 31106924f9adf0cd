// Shared by csrc/cpu/gaussian_perturb.cpp and csrc/gaussian_perturb.cu: input checks and the per-element rule
// of finetune_ext::gaussian_perturb, out = W + std[:, None] * z with z standard normal from Philox.
//
// Box-Muller on one Philox group gives four normals: words (0, 1) -> elements 4g, 4g+1 and words (2, 3) ->
// 4g+2, 4g+3, as r cos(2 pi t), r sin(2 pi t) with r = sqrt(-2 ln u), u = (w0 >> 8 + 1) / 2^24 in (0, 1] and
// t = (w1 >> 8) / 2^24 in [0, 1). ln, sin and cos are our own float32 polynomials built from single rounded
// multiplies, adds and one division (no library calls, no FMA), so the CPU kernel, the CUDA kernel and
// finetune_ext/reference/gaussian_perturb.py produce the same bits. Accuracy: a few float32 ulps.
//
// Element index = position in the weight's memory: row-major for a contiguous [out, in] weight, column-major
// for a transposed view of a contiguous [in, out] one (GPT-2's Conv1D), so both are read and written in order.
// Any other strides are made row-major contiguous first. The result has the weight's layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "common/philox.h"
#include "common/philox_arg.h"

namespace finetune_ext {

// Validates the arguments of finetune_ext::gaussian_perturb for a kernel on `device_type`; returns the key.
inline PhiloxSeed check_gaussian_perturb_args(const at::Tensor& weight, const at::Tensor& std, const at::Tensor& seed,
                                              c10::DeviceType device_type) {
  TORCH_CHECK(weight.device().type() == device_type, "gaussian_perturb: expected weight on ", device_type, ", got ",
              weight.device());
  TORCH_CHECK(weight.dim() == 2, "gaussian_perturb: expected a 2-d weight [out, in], got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()),
              "gaussian_perturb: expected weight to have a floating dtype, got ", weight.scalar_type());
  TORCH_CHECK(std.scalar_type() == at::kFloat && std.dim() == 1 && std.size(0) == weight.size(0),
              "gaussian_perturb: expected std of dtype float32 and shape [", weight.size(0), "] (weight.size(0)), got ",
              std.scalar_type(), " of shape ", std.sizes());
  TORCH_CHECK(std.device() == weight.device(), "gaussian_perturb: expected std on ", weight.device(),
              " (the device of weight), got ", std.device());
  return philox_seed_arg(seed, "gaussian_perturb");
}

// The weight's elements as a dense storage matrix [rows, cols] and an empty result laid out like it. No views
// are made (each would be a dispatcher call, and the op runs twice per adapted layer and training step).
struct PerturbLayout {
  at::Tensor data;     // the weight (row-major, or a transposed view of a row-major [in, out]) or a row-major copy
  at::Tensor out;      // the result, with data's strides
  int64_t rows, cols;  // of the storage matrix: [in, out] for a transposed view
  bool per_column;     // std index = storage column (transposed view) instead of storage row
};

// weight.t().is_contiguous(), without making the view.
inline bool is_transposed_contiguous(const at::Tensor& weight) {
  const int64_t out = weight.size(0), in = weight.size(1);
  return (out == 1 || weight.stride(0) == 1) && (in == 1 || weight.stride(1) == out);
}

inline PerturbLayout perturb_layout(const at::Tensor& weight) {
  const int64_t out = weight.size(0), in = weight.size(1);
  if (!weight.is_contiguous() && is_transposed_contiguous(weight)) {
    return {weight, at::empty_strided({out, in}, {1, out}, weight.options()), in, out, true};
  }
  const at::Tensor data = weight.contiguous();
  return {data, at::empty({out, in}, weight.options()), out, in, false};
}

// Correctly rounded float32 arithmetic that no compiler contracts into an FMA.
FTX_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FTX_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FTX_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FTX_HOST_DEVICE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// mask ? a : b for a mask of all ones or all zeros: no branch, so the CPU loops over arrays vectorise.
FTX_HOST_DEVICE uint32_t mask_of(bool cond) { return 0u - static_cast<uint32_t>(cond); }

FTX_HOST_DEVICE float select(uint32_t mask, float a, float b) {
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}

FTX_HOST_DEVICE float flip_sign(float x, uint32_t flip) { return bits_float(float_bits(x) ^ (flip << 31)); }

// sqrt(-2 ln u) for u in (0, 1]: u = m 2^e with m in [sqrt(1/2), sqrt(2)], ln m = 2 atanh(s), s = (m-1)/(m+1).
FTX_HOST_DEVICE float box_muller_radius(float u) {
  const uint32_t bits = float_bits(u);
  float e = static_cast<float>(static_cast<int>(bits >> 23) - 127);
  float m = bits_float((bits & 0x7FFFFFu) | 0x3F800000u);
  const uint32_t high = mask_of(m > 0x1.6a09e6p+0f);  // sqrt(2)
  m = select(high, mul_rn(m, 0.5f), m);
  e = select(high, add_rn(e, 1.0f), e);
#if defined(__CUDA_ARCH__)
  const float s = __fdiv_rn(add_rn(m, -1.0f), add_rn(m, 1.0f));
#else
  const float s = add_rn(m, -1.0f) / add_rn(m, 1.0f);
#endif
  const float s2 = mul_rn(s, s);
  float p = 0x1.745d18p-4f;                   // 1/11
  p = add_rn(mul_rn(p, s2), 0x1.c71c72p-4f);  // 1/9
  p = add_rn(mul_rn(p, s2), 0x1.24924ap-3f);  // 1/7
  p = add_rn(mul_rn(p, s2), 0x1.99999ap-3f);  // 1/5
  p = add_rn(mul_rn(p, s2), 0x1.555556p-2f);  // 1/3
  p = add_rn(mul_rn(p, s2), 1.0f);
  const float ln_u = add_rn(mul_rn(e, 0x1.62e43p-1f), mul_rn(mul_rn(2.0f, s), p));  // e ln 2 + ln m
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(mul_rn(-2.0f, ln_u));
#else
  return std::sqrt(mul_rn(-2.0f, ln_u));
#endif
}

// (cos, sin) of 2 pi t for t in [0, 1): quadrant q, then the angle folded into [0, pi/4] and Taylor series.
FTX_HOST_DEVICE void turn_cos_sin(float t, float* c, float* s) {
  const float q4 = mul_rn(t, 4.0f);
  const int q = static_cast<int>(q4);
  const float f = add_rn(q4, -static_cast<float>(q));
  const uint32_t fold = mask_of(f > 0.5f);
  const float x = mul_rn(select(fold, add_rn(1.0f, -f), f), 0x1.921fb6p+0f);  // pi/2
  const float x2 = mul_rn(x, x);
  float ps = 0x1.71de3ap-19f;                     // 1/9!
  ps = add_rn(mul_rn(ps, x2), -0x1.a01a02p-13f);  // -1/7!
  ps = add_rn(mul_rn(ps, x2), 0x1.111112p-7f);    // 1/5!
  ps = add_rn(mul_rn(ps, x2), -0x1.555556p-3f);   // -1/3!
  ps = add_rn(mul_rn(ps, x2), 1.0f);
  const float sin_x = mul_rn(ps, x);
  float pc = -0x1.27e4fcp-22f;                    // -1/10!
  pc = add_rn(mul_rn(pc, x2), 0x1.a01a02p-16f);   // 1/8!
  pc = add_rn(mul_rn(pc, x2), -0x1.6c16c2p-10f);  // -1/6!
  pc = add_rn(mul_rn(pc, x2), 0x1.555556p-5f);    // 1/4!
  pc = add_rn(mul_rn(pc, x2), -0.5f);
  const float cos_x = add_rn(mul_rn(pc, x2), 1.0f);
  // (sin, cos) of the in-quadrant angle, then rotated by q quarter turns: odd q swaps them, q = 1, 2 negate
  // the cosine and q = 2, 3 the sine.
  const uint32_t swap = fold ^ (0u - static_cast<uint32_t>(q & 1));
  *c = flip_sign(select(swap, sin_x, cos_x), static_cast<uint32_t>((q ^ (q >> 1)) & 1));
  *s = flip_sign(select(swap, cos_x, sin_x), static_cast<uint32_t>(q >> 1));
}

// The four normals of Philox group `group`.
FTX_HOST_DEVICE void philox_normal4(const Philox4& r, float* z) {
  const float inv = 1.0f / 16777216.0f;
  FTX_UNROLL
  for (int pair = 0; pair < 2; ++pair) {
    const float u = mul_rn(static_cast<float>((r.v[2 * pair] >> 8) + 1u), inv);
    const float t = mul_rn(static_cast<float>(r.v[2 * pair + 1] >> 8), inv);
    const float radius = box_muller_radius(u);
    float c, s;
    turn_cos_sin(t, &c, &s);
    z[2 * pair] = mul_rn(radius, c);
    z[2 * pair + 1] = mul_rn(radius, s);
  }
}

// W + std * z in the op-math type, multiply and add rounded apart.
template <typename acc_t>
FTX_HOST_DEVICE acc_t perturb_value(acc_t w, float std, float z) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc_t) == sizeof(double)) {
    return __dadd_rn(w, __dmul_rn(static_cast<double>(std), static_cast<double>(z)));
  } else {
    return __fadd_rn(w, __fmul_rn(std, z));
  }
#else
  return w + static_cast<acc_t>(std) * static_cast<acc_t>(z);
#endif
}

}  // namespace finetune_ext
