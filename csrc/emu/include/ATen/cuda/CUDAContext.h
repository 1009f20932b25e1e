#pragma once
// at::cuda's stream and device queries on the host emulation: the device is an sm_80 with
// 108 SMs and 163 KiB of opt-in shared memory per block (the smaller of the two build targets).
#include "c10/cuda/CUDAStream.h"

struct cudaDeviceProp {
  int major = 8, minor = 0, multiProcessorCount = 108, warpSize = 32, maxThreadsPerBlock = 1024;
  size_t sharedMemPerBlock = 49152, sharedMemPerBlockOptin = 166912;
  size_t sharedMemPerMultiprocessor = 167936;
};

namespace at::cuda {
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp prop;
  return &prop;
}
}  // namespace at::cuda
