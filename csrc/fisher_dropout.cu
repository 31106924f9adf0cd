// CUDA kernel of finetune_ext::fisher_dropout (_fisher_dropout_kernel). Each thread takes kGroups Philox groups
// of 8 elements of x per step (one 16-byte load per group for bf16/fp16, two for fp32), all loads issued first,
// then one Philox call per group (16-bit uniforms), and writes y with vector stores. No mask is stored: backward
// calls the same kernel on the incoming gradient.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/cuda_device.h"
#include "fisher_dropout.h"

namespace finetune_ext {
namespace {

constexpr int kThreads = 256;

constexpr int kElems = 8;   // elements of one Philox group
constexpr int kGroups = 2;  // groups a thread takes per step: their loads are all in flight before the first Philox

// Loaded and stored as 16-byte vectors (two for fp32, four for fp64): x needs 16-byte alignment, not the Pack's size.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N < 16 ? sizeof(scalar_t) * N : 16) Pack {
  scalar_t v[N];
};

template <typename scalar_t, bool kPerFeature, bool kResidual, bool kVector>
__global__ void __launch_bounds__(kThreads)
    _fisher_dropout_kernel(const scalar_t* __restrict__ x, const float* __restrict__ keep,
                           const scalar_t* __restrict__ residual, scalar_t* __restrict__ y, int64_t n, int64_t d,
                           uint64_t seed, uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int N = kElems, E = kGroups * kElems;  // a chunk: kGroups consecutive groups
  const int64_t chunks = (n + E - 1) / E;
  const float keep0 = kPerFeature ? 0.0f : __ldg(keep);
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // The feature of a chunk's first element, advanced by a fixed amount per step: one 64-bit modulo per thread,
  // not one per chunk (a 64-bit division is a long software routine on the GPU).
  int64_t first_f = kPerFeature ? first * E % d : 0;
  const int64_t step_f = kPerFeature ? step * E % d : 0;
  for (int64_t c = first; c < chunks; c += step) {
    const int64_t base = c * E;
    const bool full = kVector && base + E <= n;
    Pack<scalar_t, N> xv[kGroups], rv[kGroups];
    if (full) {  // loads first: they are in flight while Philox runs
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        xv[g] = *reinterpret_cast<const Pack<scalar_t, N>*>(x + base + g * N);
        if constexpr (kResidual) rv[g] = *reinterpret_cast<const Pack<scalar_t, N>*>(residual + base + g * N);
      }
    }
    int64_t f = first_f;
    if (kPerFeature) first_f = first_f + step_f < d ? first_f + step_f : first_f + step_f - d;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const int64_t start = base + g * N;
      float u[N];
      const Philox4 r = philox_group(seed, offset, static_cast<uint64_t>(c * kGroups + g));
#pragma unroll
      for (int i = 0; i < N; ++i) u[i] = philox_uniform(r.v[i / 2], i % 2);
      if (full) {
        Pack<scalar_t, N> yv;
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float k = kPerFeature ? __ldg(keep + f) : keep0;
          if (kPerFeature && ++f == d) f = 0;
          acc_t v = dropout_value<acc_t>(static_cast<acc_t>(xv[g].v[i]), k, u[i]);
          if constexpr (kResidual) v = static_cast<acc_t>(rv[g].v[i]) + v;
          yv.v[i] = static_cast<scalar_t>(v);
        }
        *reinterpret_cast<Pack<scalar_t, N>*>(y + start) = yv;
      } else {
        for (int i = 0; i < N && start + i < n; ++i) {
          const float k = kPerFeature ? __ldg(keep + f) : keep0;
          if (kPerFeature && ++f == d) f = 0;
          acc_t v = dropout_value<acc_t>(static_cast<acc_t>(x[start + i]), k, u[i]);
          if constexpr (kResidual) v = static_cast<acc_t>(residual[start + i]) + v;
          y[start + i] = static_cast<scalar_t>(v);
        }
      }
    }
  }
}

// One wave of blocks at most, each looping over its chunks.
template <typename scalar_t, bool kPerFeature, bool kResidual, bool kVector>
void launch_kernel(const scalar_t* x, const float* keep, const scalar_t* residual, scalar_t* y, int64_t n, int64_t d,
                   PhiloxSeed s, int device, cudaStream_t stream) {
  static OneWaveGrid grid;
  const auto kernel = _fisher_dropout_kernel<scalar_t, kPerFeature, kResidual, kVector>;
  const int64_t chunks = (n + kGroups * kElems - 1) / (kGroups * kElems);
  kernel<<<grid.blocks(kernel, kThreads, chunks, device), kThreads, 0, stream>>>(x, keep, residual, y, n, d, s.seed,
                                                                                 s.offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The vector kernel when x, y and residual are aligned for its 16-byte loads and stores.
template <typename scalar_t, bool kPerFeature, bool kResidual>
void launch(const scalar_t* x, const float* keep, const scalar_t* residual, scalar_t* y, int64_t n, int64_t d,
            PhiloxSeed s, int device, cudaStream_t stream) {
  constexpr uintptr_t kAlign = alignof(Pack<scalar_t, kElems>);
  const bool aligned = reinterpret_cast<uintptr_t>(x) % kAlign == 0 && reinterpret_cast<uintptr_t>(y) % kAlign == 0 &&
                       (!kResidual || reinterpret_cast<uintptr_t>(residual) % kAlign == 0);
  if (aligned) {
    launch_kernel<scalar_t, kPerFeature, kResidual, true>(x, keep, residual, y, n, d, s, device, stream);
  } else {
    launch_kernel<scalar_t, kPerFeature, kResidual, false>(x, keep, residual, y, n, d, s, device, stream);
  }
}

at::Tensor fisher_dropout_cuda(const at::Tensor& x, const at::Tensor& keep, const std::optional<at::Tensor>& residual,
                               const at::Tensor& seed) {
  const PhiloxSeed s = check_fisher_dropout_args(x, keep, residual, seed, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor keep_c = keep.contiguous();
  const at::Tensor r_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t n = x.numel();
  if (n == 0) return y;
  const int64_t d = x.dim() == 0 ? 1 : x.size(-1);
  const bool per_feature = keep_c.numel() != 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  refuse_graph_capture(stream, "fisher_dropout");
  const int device = x.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fisher_dropout_cuda", [&] {
    const scalar_t* xp = x_c.const_data_ptr<scalar_t>();
    const scalar_t* rp = r_c.defined() ? r_c.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const float* kp = keep_c.const_data_ptr<float>();
    if (per_feature) {
      rp ? launch<scalar_t, true, true>(xp, kp, rp, yp, n, d, s, device, stream)
         : launch<scalar_t, true, false>(xp, kp, rp, yp, n, d, s, device, stream);
    } else {
      rp ? launch<scalar_t, false, true>(xp, kp, rp, yp, n, d, s, device, stream)
         : launch<scalar_t, false, false>(xp, kp, rp, yp, n, d, s, device, stream);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CUDA, m) { m.impl("fisher_dropout", &fisher_dropout_cuda); }

}  // namespace finetune_ext
