#pragma once
// Host/device qualifiers for code shared by the C++ CPU and the CUDA kernels.
#if defined(__CUDACC__)
#define LLADA_HD __host__ __device__ __forceinline__
#else
#define LLADA_HD inline
#endif
