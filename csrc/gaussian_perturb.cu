// CUDA kernel of finetune_ext::gaussian_perturb (_gaussian_perturb_kernel): out = W + std[:, None] * z. Each
// thread owns one Philox group (four elements of the row-major [out, in] index), turns its words into four
// normals (Box-Muller, gaussian_perturb.h) and writes the perturbed weight; W is read through its strides, so
// GPT-2's transposed Conv1D weight needs no copy. Bit-identical to the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "gaussian_perturb.h"

namespace finetune_ext {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    _gaussian_perturb_kernel(const scalar_t* __restrict__ w, int64_t s0, int64_t s1, const float* __restrict__ std,
                             scalar_t* __restrict__ out, int64_t rows, int64_t cols, uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = rows * cols;
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float z[4];
    philox_normal4(philox_group(seed, offset, static_cast<uint64_t>(g)), z);
    const int64_t first = 4 * g;
    int64_t i = first / cols, j = first % cols;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (first + e < n) {
        const acc_t v = perturb_value<acc_t>(static_cast<acc_t>(w[i * s0 + j * s1]), __ldg(std + i), z[e]);
        out[first + e] = static_cast<scalar_t>(v);
      }
      if (++j == cols) {
        j = 0;
        ++i;
      }
    }
  }
}

int multiprocessors(int device) {
  static int cached[64] = {0};
  if (device >= 64) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }
  if (cached[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device));
  }
  return cached[device];
}

at::Tensor gaussian_perturb_cuda(const at::Tensor& weight, const at::Tensor& std, const at::Tensor& seed) {
  const PhiloxSeed key = check_gaussian_perturb_args(weight, std, seed, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor std_c = std.contiguous();
  at::Tensor out = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const int64_t groups = (rows * cols + 3) / 4;
  if (groups == 0) return out;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>((groups + kThreads - 1) / kThreads, multiprocessors(weight.get_device()) * 16));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "gaussian_perturb_cuda", [&] {
    _gaussian_perturb_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        weight.const_data_ptr<scalar_t>(), weight.stride(0), weight.stride(1), std_c.const_data_ptr<float>(),
        out.mutable_data_ptr<scalar_t>(), rows, cols, key.seed, key.offset);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CUDA, m) { m.impl("gaussian_perturb", &gaussian_perturb_cuda); }

}  // namespace finetune_ext
