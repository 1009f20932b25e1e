#pragma once
// One stream: kernels run to completion at their launch (csrc/emu/cuda_emu.h).
#include <c10/core/Device.h>
#include "cuda_runtime.h"

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace c10::cuda
