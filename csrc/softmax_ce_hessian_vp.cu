// CUDA kernel of finetune_ext::softmax_ce_hessian_vp (_softmax_ce_hessian_vp_kernel). One block per row:
// an online max/sum pass over the logits, then for each chunk of up to kRowChunk vectors one pass that reduces
// p.v for all of them and one pass that writes p * (v - p.v). When the row's probabilities fit in the
// device's shared memory (kCached: a 50257-word fp32 row needs 196 KiB, which H100/H200/B200 have, A100 not)
// the logits are read once and the probabilities kept there; otherwise they are recomputed from the logits
// in each pass. With 16-bit vectors and the probabilities cached, each vector's row is read once and kept in
// registers between its two passes (_softmax_ce_hessian_vp_resident_kernel). When there are fewer rows than
// multiprocessors, each row is cut into slices of one block each
// (_softmax_ce_hessian_vp_split_kernel): a first kernel writes each slice's max, sum of exp and unnormalised dots,
// a second combines the slices of its row and writes its slice of the output.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "common/cuda_device.h"
#include "softmax_ce_hessian_vp.h"

namespace finetune_ext {
namespace {

template <typename vec_t>
using acc_type = std::conditional_t<std::is_same_v<vec_t, double>, double, float>;

constexpr int kThreads = 512;
constexpr int kChunk = 8;  // vectors per pass over a slice of a split row
// The one-block-per-row kernel takes the vectors kRowChunk at a time, so the rows it reads for the dot products are
// still in L2 when it reads them again to write the output (2 x 100 KB per row of bf16 GPT-2 logits, times the rows
// in flight, about one per multiprocessor), and kUnroll elements of each per thread per round, so enough loads are
// in flight to cover the memory latency with one block per multiprocessor (the cached kernel's case).
constexpr int kRowChunk = 2;
constexpr int kUnroll = 8;
// The one-block-per-row kernel's block: the cached variant's 196 KiB leave room for one block per multiprocessor,
// so the block is as large as CUDA allows (the H200 ran 512 threads at 0.6x torch.compile: still latency-bound).
constexpr int kRowThreads = 1024;
// The resident kernel's elements of a row per thread: 26 registers, and rows up to 53248 wide (GPT-2's 50257;
// 56 would spill at 1024 threads).
constexpr int kResident = 52;
constexpr int kSlice = 4096;  // the longest slice of a split row: its exp values fit in static shared memory

template <typename T>
__device__ __forceinline__ T warp_reduce(T v, bool is_max) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = is_max ? (other > v ? other : v) : v + other;
  }
  return v;
}

// Sum or max over the block of each of the K values v[i], into v[i] in every thread. smem holds 32 * K values.
template <int K, typename T>
__device__ void block_reduce(T (&v)[K], bool is_max, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T neutral = is_max ? -std::numeric_limits<T>::infinity() : T(0);
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = warp_reduce(v[i], is_max);
  __syncthreads();  // smem may still be read by the previous call
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) smem[warp * K + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) {
    v[i] = threadIdx.x < (blockDim.x >> 5) ? smem[lane * K + i] : neutral;
    if (warp == 0) v[i] = warp_reduce(v[i], is_max);
  }
  if (threadIdx.x == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) smem[i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = smem[i];
}

// Sum or max over the block of one value; every thread gets the result. smem holds 32 values.
template <typename T>
__device__ T block_reduce(T v, bool is_max, T* smem) {
  T one[1] = {v};
  block_reduce(one, is_max, smem);
  return one[0];
}

// out[k][row] = 0 for every vector k: the row's label is ignore_index.
template <typename vec_t>
__device__ void zero_row(vec_t* __restrict__ out, int64_t row, int64_t m, int64_t n, int64_t c) {
  for (int64_t k = 0; k < m; ++k) {
    for (int64_t j = threadIdx.x; j < c; j += blockDim.x) out[(k * n + row) * c + j] = vec_t(0);
  }
}

// The row's softmax by one block of kRowThreads: an online max/sum pass over the logits, then the block's max and
// 1 / sum into gmax and inv. kCached: cache[j] = p_j as well. Thread t handles the elements j = t (mod
// kRowThreads) here and in every loop of the callers, so it reads back from the cache only entries it wrote itself:
// no barrier needed.
template <typename logit_t, typename acc_t, bool kCached>
__device__ void row_softmax(const logit_t* __restrict__ zr, int64_t c, acc_t* cache, acc_t* smem, acc_t& gmax,
                            acc_t& inv) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr int64_t kRound = kUnroll * kRowThreads;  // elements of a row one round of the block covers
  acc_t tmax = kNegInf, tsum = 0;
  for (int64_t j0 = threadIdx.x; j0 < c; j0 += kRound) {
    acc_t x[kUnroll];
    acc_t rmax = kNegInf;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * kRowThreads;
      x[u] = j < c ? static_cast<acc_t>(zr[j]) : kNegInf;
      rmax = x[u] > rmax ? x[u] : rmax;
    }
    if (rmax > tmax) {
      tsum *= exp(tmax - rmax);  // 0 * exp(-inf) = 0 while nothing was added yet
      tmax = rmax;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * kRowThreads;
      if (j < c) {
        if constexpr (kCached) cache[j] = x[u];
        if (tmax != kNegInf) tsum += exp(x[u] - tmax);  // exp(-inf - -inf) would be NaN
      }
    }
  }
  gmax = block_reduce(tmax, true, smem);
  tsum = tmax == kNegInf ? acc_t(0) : tsum * exp(tmax - gmax);
  inv = acc_t(1) / block_reduce(tsum, false, smem);
  if constexpr (kCached) {
    for (int64_t j = threadIdx.x; j < c; j += kRowThreads) cache[j] = exp(cache[j] - gmax) * inv;
  }
}

template <typename logit_t, typename vec_t, bool kCached>
__global__ void __launch_bounds__(kRowThreads)
    _softmax_ce_hessian_vp_kernel(const logit_t* __restrict__ z, const vec_t* __restrict__ v,
                                  const int64_t* __restrict__ labels, int64_t ignore_index,
                                  const void* __restrict__ scale, vec_t* __restrict__ out, int64_t m, int64_t n,
                                  int64_t c) {
  using acc_t = acc_type<vec_t>;
  constexpr int64_t kRound = kUnroll * kRowThreads;
  __shared__ acc_t smem[32];
  extern __shared__ __align__(16) unsigned char cache_bytes[];  // kCached: the row, then its probabilities (c values)
  acc_t* cache = reinterpret_cast<acc_t*>(cache_bytes);
  const int64_t row = blockIdx.x;
  if (labels != nullptr && labels[row] == ignore_index) return zero_row(out, row, m, n, c);
  const logit_t* zr = z + row * c;
  acc_t gmax, inv;
  row_softmax<logit_t, acc_t, kCached>(zr, c, cache, smem, gmax, inv);
  const acc_t s = scale != nullptr ? *static_cast<const acc_t*>(scale) : acc_t(1);
  const auto prob = [&](int64_t j) -> acc_t {
    if constexpr (kCached) return cache[j];
    return exp(static_cast<acc_t>(zr[j]) - gmax) * inv;
  };

  const int64_t stride = n * c;  // from one vector's row to the next vector's
  for (int64_t k0 = 0; k0 < m; k0 += kRowChunk) {
    const int kk = static_cast<int>(m - k0 < kRowChunk ? m - k0 : kRowChunk);
    const vec_t* vr = v + (k0 * n + row) * c;
    vec_t* outr = out + (k0 * n + row) * c;
    // kRowChunk vectors, kUnroll elements each: every load of a round is issued before its products.
    const auto load = [&](int64_t j0, acc_t(&x)[kRowChunk][kUnroll], acc_t(&p)[kUnroll]) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kRowThreads;
        p[u] = j < c ? prob(j) : acc_t(0);
#pragma unroll
        for (int i = 0; i < kRowChunk; ++i)
          x[i][u] = i < kk && j < c ? static_cast<acc_t>(vr[i * stride + j]) : acc_t(0);
      }
    };
    acc_t d[kRowChunk];
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) d[i] = 0;
    for (int64_t j0 = threadIdx.x; j0 < c; j0 += kRound) {
      acc_t x[kRowChunk][kUnroll], p[kUnroll];
      load(j0, x, p);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < kRowChunk; ++i) d[i] += p[u] * x[i][u];
      }
    }
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i)
      d[i] = i < kk ? block_reduce(d[i], false, smem) : acc_t(0);  // kk: block-uniform
    // The chunk's rows were just read for the dot products: this second read is mostly L2 hits.
    for (int64_t j0 = threadIdx.x; j0 < c; j0 += kRound) {
      acc_t x[kRowChunk][kUnroll], p[kUnroll];
      load(j0, x, p);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kRowThreads;
#pragma unroll
        for (int i = 0; i < kRowChunk; ++i) {
          if (i < kk && j < c) outr[i * stride + j] = static_cast<vec_t>(p[u] * (x[i][u] - d[i]) * s);
        }
      }
    }
  }
}

// The cached kernel for 16-bit vectors, reading each vector's row once: thread t keeps its elements j = t (mod
// kRowThreads) of the row, kResident at most, in registers (two 16-bit values a register) from the dot product's
// pass to the output's, instead of reading the row again. Every load of a row is issued before the first product.
template <typename logit_t, typename vec_t>
__global__ void __launch_bounds__(kRowThreads)
    _softmax_ce_hessian_vp_resident_kernel(const logit_t* __restrict__ z, const vec_t* __restrict__ v,
                                           const int64_t* __restrict__ labels, int64_t ignore_index,
                                           const float* __restrict__ scale, vec_t* __restrict__ out, int64_t m,
                                           int64_t n, int64_t c) {
  static_assert(sizeof(vec_t) == 2, "two values a register");
  constexpr int kPairs = kResident / 2;
  __shared__ float smem[32];
  extern __shared__ __align__(16) unsigned char cache_bytes[];  // the row's probabilities (c values)
  float* p = reinterpret_cast<float*>(cache_bytes);
  const int64_t row = blockIdx.x;
  if (labels != nullptr && labels[row] == ignore_index) return zero_row(out, row, m, n, c);
  float gmax, inv;
  row_softmax<logit_t, float, true>(z + row * c, c, p, smem, gmax, inv);
  const float s = scale != nullptr ? *scale : 1.0f;
  // Element h of pair i: j = threadIdx.x + (2 i + h) kRowThreads, in 32 bits (c <= kResident * kRowThreads).
  const int width = static_cast<int>(c);
  const auto index = [](int i, int h) -> int { return static_cast<int>(threadIdx.x) + (2 * i + h) * kRowThreads; };
  const auto value = [](uint32_t pair, int h) -> float {
    return static_cast<float>(vec_t(static_cast<uint16_t>(h ? pair >> 16 : pair & 0xffffu), vec_t::from_bits()));
  };
  for (int64_t k = 0; k < m; ++k) {
    const uint16_t* vr = reinterpret_cast<const uint16_t*>(v + (k * n + row) * c);
    vec_t* outr = out + (k * n + row) * c;
    uint32_t w[kPairs];
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const uint32_t lo = index(i, 0) < width ? vr[index(i, 0)] : 0u;
      const uint32_t hi = index(i, 1) < width ? vr[index(i, 1)] : 0u;
      w[i] = lo | hi << 16;
    }
    float d = 0;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (index(i, h) < width) d += p[index(i, h)] * value(w[i], h);
      }
    }
    d = block_reduce(d, false, smem);
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = index(i, h);
        if (j < width) outr[j] = static_cast<vec_t>(p[j] * (value(w[i], h) - d) * s);
      }
    }
  }
}

// Pass 1 of a split row, block (slice, row): the slice's max, sum of exp(z - max) and, for every vector k,
// sum of exp(z - max) * v_k, written to ws[row][slice] = [max, sum, dot_0 .. dot_{m-1}].
template <typename logit_t, typename vec_t>
__global__ void __launch_bounds__(kThreads)
    _softmax_ce_hessian_vp_split_kernel(const logit_t* __restrict__ z, const vec_t* __restrict__ v,
                                        const int64_t* __restrict__ labels, int64_t ignore_index,
                                        acc_type<vec_t>* __restrict__ ws, int64_t m, int64_t n, int64_t c,
                                        int64_t slice) {
  using acc_t = acc_type<vec_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  __shared__ acc_t smem[32 * kChunk];  // every reduction's, the kChunk dots' too
  __shared__ acc_t e[kSlice];
  const int64_t row = blockIdx.y, j0 = blockIdx.x * slice;
  const int64_t len = c - j0 < slice ? c - j0 : slice;
  if (labels != nullptr && labels[row] == ignore_index) return;  // pass 2 writes its zeros
  acc_t* w = ws + (row * gridDim.x + blockIdx.x) * (2 + m);
  // Each thread reads back only the entries of e it wrote itself: no barrier between the loops.
  acc_t tmax = kNegInf;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    e[j] = static_cast<acc_t>(z[row * c + j0 + j]);
    tmax = e[j] > tmax ? e[j] : tmax;
  }
  const acc_t smax = block_reduce(tmax, true, smem);
  acc_t tsum = 0;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    e[j] = smax == kNegInf ? acc_t(0) : exp(e[j] - smax);
    tsum += e[j];
  }
  const acc_t ssum = block_reduce(tsum, false, smem);
  if (threadIdx.x == 0) {
    w[0] = smax;
    w[1] = ssum;
  }
  // The dots of kChunk vectors at a time in one pass over the slice (their loads in flight together) and one
  // block reduction for all of them.
  for (int64_t k0 = 0; k0 < m; k0 += kChunk) {
    const int kk = static_cast<int>(m - k0 < kChunk ? m - k0 : kChunk);
    const vec_t* vr = v + (k0 * n + row) * c + j0;
    acc_t d[kChunk] = {};
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        if (i < kk) d[i] += e[j] * static_cast<acc_t>(vr[i * n * c + j]);
      }
    }
    block_reduce(d, false, smem);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        if (i < kk) w[2 + k0 + i] = d[i];
      }
    }
  }
}

// Pass 2 of a split row, block (slice, row): the row's max, sum and dots from its slices' partials, then
// out = p * (v - p.v) * scale over the slice.
template <typename logit_t, typename vec_t>
__global__ void __launch_bounds__(kThreads)
    _softmax_ce_hessian_vp_combine_kernel(const logit_t* __restrict__ z, const vec_t* __restrict__ v,
                                          const int64_t* __restrict__ labels, int64_t ignore_index,
                                          const acc_type<vec_t>* __restrict__ ws, const void* __restrict__ scale,
                                          vec_t* __restrict__ out, int64_t m, int64_t n, int64_t c, int64_t slice) {
  using acc_t = acc_type<vec_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  __shared__ acc_t smem[32];
  __shared__ acc_t dots[kChunk];
  const int64_t row = blockIdx.y, j0 = blockIdx.x * slice, slices = gridDim.x;
  const int64_t len = c - j0 < slice ? c - j0 : slice;
  if (labels != nullptr && labels[row] == ignore_index) {
    for (int64_t k = 0; k < m; ++k) {
      for (int64_t j = threadIdx.x; j < len; j += blockDim.x) out[(k * n + row) * c + j0 + j] = vec_t(0);
    }
    return;
  }
  const acc_t* w = ws + row * slices * (2 + m);
  acc_t tmax = kNegInf;
  for (int64_t i = threadIdx.x; i < slices; i += blockDim.x) tmax = w[i * (2 + m)] > tmax ? w[i * (2 + m)] : tmax;
  const acc_t gmax = block_reduce(tmax, true, smem);
  // A slice's weight exp(max_slice - max_row); 0 for an all -inf slice (exp(-inf - -inf) would be NaN).
  const auto weight = [&](int64_t i) -> acc_t {
    return w[i * (2 + m)] == kNegInf ? acc_t(0) : exp(w[i * (2 + m)] - gmax);
  };
  acc_t tsum = 0;
  for (int64_t i = threadIdx.x; i < slices; i += blockDim.x) tsum += w[i * (2 + m) + 1] * weight(i);
  const acc_t inv = acc_t(1) / block_reduce(tsum, false, smem);
  const acc_t s = scale != nullptr ? *static_cast<const acc_t*>(scale) : acc_t(1);
  for (int64_t k0 = 0; k0 < m; k0 += kChunk) {
    const int kk = static_cast<int>(m - k0 < kChunk ? m - k0 : kChunk);
    if (threadIdx.x < kk) {
      acc_t d = 0;
      for (int64_t i = 0; i < slices; ++i) d += w[i * (2 + m) + 2 + k0 + threadIdx.x] * weight(i);
      dots[threadIdx.x] = d * inv;
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const acc_t p = exp(static_cast<acc_t>(z[row * c + j0 + j]) - gmax) * inv;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        if (i < kk) {
          const int64_t idx = ((k0 + i) * n + row) * c + j0 + j;
          out[idx] = static_cast<vec_t>(p * (static_cast<acc_t>(v[idx]) - dots[i]) * s);
        }
      }
    }
    __syncthreads();  // dots is rewritten by the next chunk
  }
}

// The slice length that gives about two blocks per multiprocessor, a multiple of the block size and at most kSlice;
// 0 when one block per row already fills the device or the row would be a single slice.
int64_t split_slice(int64_t n, int64_t c, int device) {
  const int64_t sms = multiprocessors(device);
  if (n >= sms) return 0;
  const int64_t want = (c * n + 2 * sms - 1) / (2 * sms);
  int64_t slice = (want + kThreads - 1) / kThreads * kThreads;
  slice = slice < kSlice ? slice : kSlice;
  return slice < c ? slice : 0;
}

constexpr size_t kStaticBytes = 1024;  // the row kernels' own shared arrays, with room to spare

// Lets kernel take `bytes` of dynamic shared memory when, with its static arrays, that is more than the default
// 48 KiB.
template <typename Kernel>
void opt_in_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes + kStaticBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Split rows when there are few, else the cached kernel when a row of probabilities fits in the shared memory a
// block may opt into, else the recomputing one.
template <typename logit_t, typename vec_t>
void launch(const logit_t* z, const vec_t* v, const int64_t* labels, int64_t ignore_index, const void* scale,
            vec_t* out, int64_t m, int64_t n, int64_t c, const at::TensorOptions& options, cudaStream_t stream) {
  using acc_t = acc_type<vec_t>;
  const int device = options.device().index();
  if (const int64_t slice = split_slice(n, c, device)) {
    const dim3 grid(static_cast<unsigned>((c + slice - 1) / slice), static_cast<unsigned>(n));
    const at::Tensor ws = at::empty({static_cast<int64_t>(grid.x) * n * (2 + m)},
                                    options.dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
    acc_t* wp = static_cast<acc_t*>(ws.data_ptr());
    _softmax_ce_hessian_vp_split_kernel<logit_t, vec_t>
        <<<grid, kThreads, 0, stream>>>(z, v, labels, ignore_index, wp, m, n, c, slice);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    _softmax_ce_hessian_vp_combine_kernel<logit_t, vec_t>
        <<<grid, kThreads, 0, stream>>>(z, v, labels, ignore_index, wp, scale, out, m, n, c, slice);
    return;
  }
  const size_t bytes = static_cast<size_t>(c) * sizeof(acc_t);
  if (bytes + kStaticBytes <= static_cast<size_t>(shared_memory_per_block_optin(device))) {
    if constexpr (sizeof(vec_t) == 2) {
      if (c <= int64_t{kResident} * kRowThreads) {
        const auto kernel = _softmax_ce_hessian_vp_resident_kernel<logit_t, vec_t>;
        opt_in_shared_memory(kernel, bytes);
        kernel<<<n, kRowThreads, bytes, stream>>>(z, v, labels, ignore_index, static_cast<const float*>(scale), out, m,
                                                  n, c);
        return;
      }
    }
    const auto kernel = _softmax_ce_hessian_vp_kernel<logit_t, vec_t, true>;
    opt_in_shared_memory(kernel, bytes);
    kernel<<<n, kRowThreads, bytes, stream>>>(z, v, labels, ignore_index, scale, out, m, n, c);
  } else {
    _softmax_ce_hessian_vp_kernel<logit_t, vec_t, false>
        <<<n, kRowThreads, 0, stream>>>(z, v, labels, ignore_index, scale, out, m, n, c);
  }
}

at::Tensor softmax_ce_hessian_vp_cuda(const at::Tensor& logits, const at::Tensor& V,
                                      const std::optional<at::Tensor>& labels, int64_t ignore_index,
                                      const std::optional<at::Tensor>& scale) {
  const HessianVpTensors t = prepare_softmax_ce_hessian_vp(logits, V, labels, scale, c10::DeviceType::CUDA);
  const at::Tensor &z = t.logits, &v = t.V, &lab = t.labels, &out = t.out;
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t m = V.size(0), n = V.size(1), c = V.size(2);
  if (out.numel() == 0) return out;
  const int64_t* lp = lab.defined() ? lab.const_data_ptr<int64_t>() : nullptr;
  const void* sp = t.scale.defined() ? t.scale.const_data_ptr() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "softmax_ce_hessian_vp_cuda", [&] {
    using logit_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "softmax_ce_hessian_vp_cuda_v", [&] {
      launch<logit_t, scalar_t>(z.const_data_ptr<logit_t>(), v.const_data_ptr<scalar_t>(), lp, ignore_index, sp,
                                out.mutable_data_ptr<scalar_t>(), m, n, c, logits.options(), stream);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(finetune_ext, CUDA, m) { m.impl("softmax_ce_hessian_vp", &softmax_ce_hessian_vp_cuda); }

}  // namespace finetune_ext
