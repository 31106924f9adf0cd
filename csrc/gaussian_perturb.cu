// CUDA kernel of finetune_ext::gaussian_perturb (_gaussian_perturb_kernel): out = W + std[:, None] * z. Each
// thread owns one Philox group (four consecutive elements of the weight's memory), turns its words into four
// normals (Box-Muller, gaussian_perturb.h) and writes the perturbed weight in the weight's layout, so GPT-2's
// transposed Conv1D weight is read and written in order. Bit-identical to the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_device.h"
#include "gaussian_perturb.h"

namespace finetune_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _gaussian_perturb_kernel(const scalar_t* __restrict__ w, const float* __restrict__ std, scalar_t* __restrict__ out,
                             int64_t rows, int64_t cols, bool per_column, uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = rows * cols;
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4];
    philox_normal4(philox_group(seed, offset, static_cast<uint64_t>(g)), z);
    // One 64-bit division per group, not per element (it is a long software routine on the GPU).
    int64_t row = 4 * g / cols, col = 4 * g - row * cols;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t p = 4 * g + e;
      if (p < n) {
        const float sd = __ldg(std + (per_column ? col : row));
        out[p] = static_cast<scalar_t>(perturb_value<acc_t>(static_cast<acc_t>(w[p]), sd, z[e]));
      }
      if (++col == cols) {
        col = 0;
        ++row;
      }
    }
  }
}

at::Tensor gaussian_perturb_cuda(const at::Tensor& weight, const at::Tensor& std, const at::Tensor& seed) {
  const PhiloxSeed key = check_gaussian_perturb_args(weight, std, seed, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(weight.device());
  const PerturbLayout layout = perturb_layout(weight);
  const at::Tensor std_c = std.contiguous();
  const int64_t rows = layout.rows, cols = layout.cols;
  const int64_t groups = (rows * cols + 3) / 4;
  if (groups == 0) return layout.out;
  const int device = weight.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  refuse_graph_capture(stream, "gaussian_perturb");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gaussian_perturb_cuda", [&] {
    static OneWaveGrid grid;  // each block loops over its groups
    const auto kernel = _gaussian_perturb_kernel<scalar_t>;
    kernel<<<grid.blocks(kernel, kThreads, groups, device), kThreads, 0, stream>>>(
        layout.data.const_data_ptr<scalar_t>(), std_c.const_data_ptr<float>(), layout.out.mutable_data_ptr<scalar_t>(),
        rows, cols, layout.per_column, key.seed, key.offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return layout.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CUDA, m) { m.impl("gaussian_perturb", &gaussian_perturb_cuda); }

}  // namespace finetune_ext
