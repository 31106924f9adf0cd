// CPU kernel of finetune_ext::gaussian_perturb: out = W + std[:, None] * z, z from Philox via Box-Muller, one
// Philox group per four elements in the weight's memory order, blocks of groups split across threads.
// Bit-identical to the CUDA kernel and to finetune_ext/reference/gaussian_perturb.py.
#include "../gaussian_perturb.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "philox_block.h"

namespace finetune_ext {
namespace {

// The 4 * groups normals of the block starting at Philox group first_group: Philox, then Box-Muller in loops
// over arrays (radius, then angle) that the compiler vectorises. Compiled for AVX-512, AVX2 and the baseline and
// chosen at load time; the arithmetic is the same IEEE operations either way (no FMA), so are the bits.
__attribute__((target_clones("avx512f", "avx2", "default"))) void normals_block(PhiloxSeed key, int64_t first_group,
                                                                                int64_t groups, float* z) {
  constexpr float kInv = 1.0f / 16777216.0f;
  uint32_t words[4 * kPhiloxBlock];
  float u[2 * kPhiloxBlock], t[2 * kPhiloxBlock], r[2 * kPhiloxBlock], c[2 * kPhiloxBlock], s[2 * kPhiloxBlock];
  philox_block(key.seed, key.offset, first_group, groups, words);
  const int64_t pairs = 2 * groups;
  for (int64_t j = 0; j < pairs; ++j) {
    u[j] = mul_rn(static_cast<float>((words[2 * j] >> 8) + 1u), kInv);
    t[j] = mul_rn(static_cast<float>(words[2 * j + 1] >> 8), kInv);
  }
  for (int64_t j = 0; j < pairs; ++j) r[j] = box_muller_radius(u[j]);
  for (int64_t j = 0; j < pairs; ++j) turn_cos_sin(t[j], &c[j], &s[j]);
  for (int64_t j = 0; j < pairs; ++j) {
    z[2 * j] = mul_rn(r[j], c[j]);
    z[2 * j + 1] = mul_rn(r[j], s[j]);
  }
}

// out = w + std * z over a contiguous [rows, cols] storage matrix, std indexed by row or by column.
template <typename scalar_t>
void gaussian_perturb_cpu_impl(const scalar_t* w, const float* std, scalar_t* out, int64_t rows, int64_t cols,
                               bool per_column, PhiloxSeed key) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kElems = 4 * kPhiloxBlock;
  const int64_t n = rows * cols;
  const int64_t blocks = (n + kElems - 1) / kElems;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    float z[kElems];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kElems;
      const int64_t count = std::min<int64_t>(kElems, n - first);
      normals_block(key, b * kPhiloxBlock, (count + 3) / 4, z);
      int64_t i = first / cols, j = first % cols;
      for (int64_t e = 0; e < count;) {  // a storage row at a time: contiguous, vectorisable runs
        const int64_t run = std::min<int64_t>(count - e, cols - j);
        const scalar_t* wi = w + first + e;
        scalar_t* o = out + first + e;
        if (per_column) {
          for (int64_t k = 0; k < run; ++k) {
            o[k] = static_cast<scalar_t>(perturb_value<acc_t>(static_cast<acc_t>(wi[k]), std[j + k], z[e + k]));
          }
        } else {
          const float sd = std[i];
          for (int64_t k = 0; k < run; ++k) {
            o[k] = static_cast<scalar_t>(perturb_value<acc_t>(static_cast<acc_t>(wi[k]), sd, z[e + k]));
          }
        }
        e += run;
        j = 0;
        ++i;
      }
    }
  });
}

at::Tensor gaussian_perturb_cpu(const at::Tensor& weight, const at::Tensor& std, const at::Tensor& seed) {
  const PhiloxSeed key = check_gaussian_perturb_args(weight, std, seed, c10::DeviceType::CPU);
  const PerturbLayout layout = perturb_layout(weight);
  const at::Tensor std_c = std.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gaussian_perturb_cpu", [&] {
    gaussian_perturb_cpu_impl<scalar_t>(layout.data.const_data_ptr<scalar_t>(), std_c.const_data_ptr<float>(),
                                        layout.out.mutable_data_ptr<scalar_t>(), layout.rows, layout.cols,
                                        layout.per_column, key);
  });
  return layout.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CPU, m) { m.impl("gaussian_perturb", &gaussian_perturb_cpu); }

}  // namespace finetune_ext
