#pragma once
// The CUDA runtime API, as far as the host emulation needs it (csrc/emu/cuda_emu.h).
#include "llada_emu/cuda_emu.h"

inline cudaError_t cudaGetLastError() { return llada_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return llada_emu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
  }
  return "unknown error";
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > 166912) return cudaErrorInvalidValue;  // sm_80: 163 KiB
    llada_emu::set_func_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  }
  return cudaSuccess;
}
