// CUDA kernels of finetune_ext::armijo_moments_ and finetune_ext::armijo_update_, multi-tensor style: one
// launch walks every tensor of the list, one thread block per 64K-element chunk (armijo.h). Tensor pointers,
// sizes and per-tensor scalars travel in one small metadata buffer copied to the device with the launch.
// The reductions write per-chunk partial sums (double, as on the CPU); the last block to finish (threadfence +
// counter) adds them per parameter block, all its threads over that block's chunks and then a tree, so the sums
// are deterministic, need a single launch and cost O(chunks / threads + blocks * log threads) at the end.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "armijo.h"

namespace finetune_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;  // elements per thread in flight: all loads of a round are issued before any math

// Per tensor: g, m, v, w pointers, numel, block; per chunk: tensor, start; per parameter block its chunks (CSR:
// chunk indices grouped by block, in chunk order, and B + 1 offsets). Packed as int64.
struct Meta {
  const int64_t* tensors;       // [T, 6]
  const int64_t* chunks;        // [C, 2]
  const double* alphas;         // [T, 2] (update only)
  const int64_t* block_chunks;  // [C] (moments only)
  const int64_t* block_start;   // [B + 1] (moments only)
};

// Sums (a, b) over the thread block, in a fixed order; every thread gets the result.
__device__ double2 block_sum2(double a, double b, double (*red)[kThreads]) {
  __syncthreads();  // red may still be read by a previous call
  red[0][threadIdx.x] = a;
  red[1][threadIdx.x] = b;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      red[0][threadIdx.x] += red[0][threadIdx.x + s];
      red[1][threadIdx.x] += red[1][threadIdx.x + s];
    }
    __syncthreads();
  }
  return make_double2(red[0][0], red[1][0]);
}

at::Tensor pack_to_device(const std::vector<int64_t>& host, const at::Device& device) {
  at::Tensor t = at::empty({static_cast<int64_t>(host.size())}, at::dtype(at::kLong).pinned_memory(true));
  std::copy(host.begin(), host.end(), t.mutable_data_ptr<int64_t>());
  return t.to(device, /*non_blocking=*/true);
}

template <typename scalar_t, bool kAdam>
__global__ void __launch_bounds__(kThreads)
    _armijo_moments_kernel(Meta meta, int64_t num_chunks, double beta1, double beta2, double bc2, double eps,
                           double* partial, double* out, int64_t num_blocks, int* done) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const int64_t* t = meta.tensors + 6 * meta.chunks[2 * c];
  const int64_t start = meta.chunks[2 * c + 1];
  const int64_t n = min(kArmijoChunk, t[4] - start);
  const scalar_t* __restrict__ g = reinterpret_cast<const scalar_t*>(t[0]) + start;
  scalar_t* __restrict__ m = kAdam ? reinterpret_cast<scalar_t*>(t[1]) + start : nullptr;
  scalar_t* __restrict__ v = kAdam ? reinterpret_cast<scalar_t*>(t[2]) + start : nullptr;
  const ArmijoConsts<acc_t> k(beta1, beta2, 1.0, bc2, eps);
  double sum_p = 0, sum_g = 0;  // double like the CPU kernel's: accept/reject decisions must not depend on the device
  for (int64_t base = threadIdx.x; base < n; base += kIlp * blockDim.x) {
    scalar_t gr[kIlp], mr[kIlp], vr[kIlp];
#pragma unroll
    for (int i = 0; i < kIlp; ++i) {
      const int64_t j = base + i * blockDim.x;
      if (j < n) {
        gr[i] = g[j];
        if (kAdam) {
          mr[i] = m[j];
          vr[i] = v[j];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kIlp; ++i) {
      const int64_t j = base + i * blockDim.x;
      if (j < n) {
        armijo_moment_element(gr[i], mr + i, vr + i, k, kAdam, sum_p, sum_g);
        if (kAdam) {
          m[j] = mr[i];
          v[j] = vr[i];
        }
      }
    }
  }
  __shared__ double red[2][kThreads];
  const double2 chunk_sum = block_sum2(sum_p, sum_g, red);
  __shared__ bool last;
  if (threadIdx.x == 0) {
    partial[2 * c] = chunk_sum.x;
    partial[2 * c + 1] = chunk_sum.y;
    __threadfence();
    last = atomicAdd(done, 1) == num_chunks - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int64_t b = 0; b < num_blocks; ++b) {
    double sp = 0, sg = 0;
    for (int64_t i = meta.block_start[b] + threadIdx.x; i < meta.block_start[b + 1]; i += blockDim.x) {
      const int64_t k = meta.block_chunks[i];
      sp += partial[2 * k];
      sg += partial[2 * k + 1];
    }
    const double2 total = block_sum2(sp, sg, red);
    if (threadIdx.x == 0) {
      out[2 * b] = total.x;
      out[2 * b + 1] = total.y;
    }
  }
}

template <typename scalar_t, bool kAdam, bool kUseM>
__global__ void __launch_bounds__(kThreads) _armijo_update_kernel(Meta meta, double bc1, double bc2, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const int64_t ti = meta.chunks[2 * c];
  const int64_t* t = meta.tensors + 6 * ti;
  const int64_t start = meta.chunks[2 * c + 1];
  const int64_t n = min(kArmijoChunk, t[4] - start);
  const acc_t ag = meta.alphas[2 * ti], am = meta.alphas[2 * ti + 1];
  const scalar_t* __restrict__ g = reinterpret_cast<const scalar_t*>(t[0]) + start;
  const scalar_t* __restrict__ m = kUseM ? reinterpret_cast<const scalar_t*>(t[1]) + start : nullptr;
  const scalar_t* __restrict__ v = kAdam ? reinterpret_cast<const scalar_t*>(t[2]) + start : nullptr;
  scalar_t* __restrict__ w = reinterpret_cast<scalar_t*>(t[3]) + start;
  const ArmijoConsts<acc_t> k(0.0, 0.0, bc1, bc2, eps);
  for (int64_t base = threadIdx.x; base < n; base += kIlp * blockDim.x) {
    scalar_t wr[kIlp], gr[kIlp], mr[kIlp], vr[kIlp];
#pragma unroll
    for (int i = 0; i < kIlp; ++i) {
      const int64_t j = base + i * blockDim.x;
      if (j < n) {
        wr[i] = w[j];
        gr[i] = g[j];
        if (kUseM) mr[i] = m[j];
        if (kAdam) vr[i] = v[j];
      }
    }
#pragma unroll
    for (int i = 0; i < kIlp; ++i) {
      const int64_t j = base + i * blockDim.x;
      if (j < n) {
        armijo_update_element(wr + i, gr[i], mr + i, vr + i, ag, am, k, kAdam, kUseM);
        w[j] = wr[i];
      }
    }
  }
}

// Tensor table [T, 6] (g, m, v, w, numel, block), chunk table [C, 2] and, with num_blocks > 0, the chunks of
// each parameter block (CSR [C] + [B + 1]), one int64 buffer on the device.
std::pair<at::Tensor, int64_t> build_meta(at::TensorList w, at::TensorList g, at::TensorList m, at::TensorList v,
                                          at::IntArrayRef block_of, int64_t num_blocks, bool adam) {
  const std::vector<ArmijoChunk> chunks = armijo_chunks(g);
  std::vector<int64_t> host;
  host.reserve(6 * g.size() + 3 * chunks.size() + num_blocks + 1);
  for (size_t i = 0; i < g.size(); ++i) {
    host.push_back(reinterpret_cast<int64_t>(g[i].const_data_ptr()));
    host.push_back(adam ? reinterpret_cast<int64_t>(m[i].data_ptr()) : 0);
    host.push_back(adam ? reinterpret_cast<int64_t>(v[i].data_ptr()) : 0);
    host.push_back(w.empty() ? 0 : reinterpret_cast<int64_t>(w[i].data_ptr()));
    host.push_back(g[i].numel());
    host.push_back(block_of.empty() ? 0 : block_of[i]);
  }
  for (const ArmijoChunk& c : chunks) {
    host.push_back(c.tensor);
    host.push_back(c.start);
  }
  if (num_blocks > 0) {  // counting sort of the chunks by parameter block, stable: chunk order within a block
    std::vector<int64_t> start(num_blocks + 1, 0);
    for (const ArmijoChunk& c : chunks) ++start[block_of[c.tensor] + 1];
    for (int64_t b = 0; b < num_blocks; ++b) start[b + 1] += start[b];
    std::vector<int64_t> grouped(chunks.size()), next(start.begin(), start.end() - 1);
    for (size_t k = 0; k < chunks.size(); ++k) grouped[next[block_of[chunks[k].tensor]]++] = static_cast<int64_t>(k);
    host.insert(host.end(), grouped.begin(), grouped.end());
    host.insert(host.end(), start.begin(), start.end());
  }
  return {pack_to_device(host, g[0].device()), static_cast<int64_t>(chunks.size())};
}

at::Tensor armijo_moments_cuda(at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                               at::IntArrayRef block_of, int64_t num_blocks, double beta1, double beta2, double bc2,
                               double eps, bool adam) {
  check_armijo_moments_args(grads, exp_avg, exp_avg_sq, block_of, num_blocks, adam, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  auto [meta, num_chunks] = build_meta({}, grads, exp_avg, exp_avg_sq, block_of, num_blocks, adam);
  const auto opts = grads[0].options();
  at::Tensor out = at::zeros({num_blocks, 2}, opts.dtype(at::kDouble));
  if (num_chunks == 0) return out;
  at::Tensor partial = at::empty({2 * num_chunks}, opts.dtype(at::kDouble));
  at::Tensor done = at::zeros({1}, opts.dtype(at::kInt));
  const int64_t* mp = meta.const_data_ptr<int64_t>();
  const int64_t* chunk_table = mp + 6 * grads.size();
  const Meta md{mp, chunk_table, nullptr, chunk_table + 2 * num_chunks, chunk_table + 3 * num_chunks};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "armijo_moments_cuda", [&] {
    auto kernel = adam ? _armijo_moments_kernel<scalar_t, true> : _armijo_moments_kernel<scalar_t, false>;
    kernel<<<num_chunks, kThreads, 0, stream>>>(md, num_chunks, beta1, beta2, bc2, eps,
                                                partial.mutable_data_ptr<double>(), out.mutable_data_ptr<double>(),
                                                num_blocks, done.mutable_data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void armijo_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                        at::ArrayRef<double> alpha_g, at::ArrayRef<double> alpha_m, double bc1, double bc2, double eps,
                        bool adam) {
  check_armijo_update_args(params, grads, exp_avg, exp_avg_sq, alpha_g, alpha_m, adam, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto [meta, num_chunks] = build_meta(params, grads, exp_avg, exp_avg_sq, {}, 0, adam);
  if (num_chunks == 0) return;
  std::vector<int64_t> bits(2 * params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    std::memcpy(&bits[2 * i], &alpha_g[i], sizeof(double));
    std::memcpy(&bits[2 * i + 1], &alpha_m[i], sizeof(double));
  }
  const at::Tensor alphas = pack_to_device(bits, params[0].device());
  const int64_t* mp = meta.const_data_ptr<int64_t>();
  const Meta md{mp, mp + 6 * params.size(), reinterpret_cast<const double*>(alphas.const_data_ptr<int64_t>()), nullptr,
                nullptr};
  // One instance per launch: m is read for every tensor when any alpha_m is nonzero (adding 0 * m, m finite,
  // changes nothing), and not at all for trials.
  const bool use_m = adam && std::any_of(alpha_m.begin(), alpha_m.end(), [](double a) { return a != 0.0; });
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "armijo_update_cuda", [&] {
    auto kernel = !adam   ? _armijo_update_kernel<scalar_t, false, false>
                  : use_m ? _armijo_update_kernel<scalar_t, true, true>
                          : _armijo_update_kernel<scalar_t, true, false>;
    kernel<<<num_chunks, kThreads, 0, stream>>>(md, bc1, bc2, eps);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CUDA, m) {
  m.impl("armijo_moments_", &armijo_moments_cuda);
  m.impl("armijo_update_", &armijo_update_cuda);
}

}  // namespace finetune_ext
