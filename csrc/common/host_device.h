// Qualifiers for functions shared by the CPU and CUDA kernels (per-element rules, Philox).
#pragma once

#if defined(__CUDACC__)
#define FTX_HOST_DEVICE __host__ __device__ __forceinline__
#define FTX_UNROLL _Pragma("unroll")
#else
#define FTX_HOST_DEVICE inline
#define FTX_UNROLL
#endif

namespace finetune_ext {

// s + a * b with the product rounded before the add, on every backend: nvcc would otherwise contract it to an
// FMA (one rounding) while the CPU build, compiled with -ffp-contract=off, rounds twice.
template <typename T>
FTX_HOST_DEVICE T mul_add_rn(T s, T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(double)) {
    return __dadd_rn(s, __dmul_rn(a, b));
  } else {
    return __fadd_rn(s, __fmul_rn(a, b));
  }
#else
  return s + a * b;
#endif
}

}  // namespace finetune_ext
