#pragma once
// c10's CUDA error checks, on the host emulation's error state (csrc/emu/cuda_emu.h).
#include <c10/util/Exception.h>
#include "cuda_runtime.h"

#define C10_CUDA_CHECK(EXPR)                                                           \
  do {                                                                                 \
    const cudaError_t llada_emu_err = (EXPR);                                          \
    TORCH_CHECK(llada_emu_err == cudaSuccess, "CUDA error (host emulation): ",         \
                cudaGetErrorString(llada_emu_err));                                     \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
