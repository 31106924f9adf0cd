// Qualifiers for functions shared by the CPU and CUDA kernels (per-element rules, Philox).
#pragma once

#if defined(__CUDACC__)
#define FTX_HOST_DEVICE __host__ __device__ __forceinline__
#define FTX_UNROLL _Pragma("unroll")
#else
#define FTX_HOST_DEVICE inline
#define FTX_UNROLL
#endif
