// Kernels that test the host emulation itself (tests/test_cuda_host_layer.py), compiled through
// the same rewriting and prelude as csrc/cuda (csrc/emu/build.py). Each one either exercises a
// part of the layer against an answer the test computes independently, or is deliberately
// broken so that a checker must reject it. Only the emulation build compiles this file.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "cuda/mma.cuh"

namespace llada_emu_test {
namespace {

constexpr int kN = 64;

// ---- a removed __syncthreads -------------------------------------------------------------------

// y[b, i] = x[b, kN - 1 - i] through shared memory. Without the barrier a thread reads a slot
// that another thread may not have written yet.
__global__ void reverse_kernel(const float* x, float* y, bool barrier) {
  __shared__ float s[kN];
  const int t = threadIdx.x;
  s[t] = x[blockIdx.x * kN + t];
  if (barrier) __syncthreads();
  y[blockIdx.x * kN + t] = s[kN - 1 - t];
}

at::Tensor reverse(const at::Tensor& x, bool barrier) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == kN && x.scalar_type() == at::kFloat && x.is_contiguous());
  at::Tensor y = at::empty_like(x);
  reverse_kernel<<<static_cast<unsigned>(x.size(0)), kN, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), y.data_ptr<float>(), barrier);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// ---- tensor cores through csrc/cuda/mma.cuh ---------------------------------------------------

// C [M, N] fp32 = A [M, K] B [K, N], one warp per 16 x 8 tile of C, K in steps of 16. variant 0
// reads B with load_b_nmajor (from B^T), 1 with load_b_kmajor (from B), 2 swaps the A fragment's
// registers 1 and 2 (a wrong fragment index: rows g + 8 and columns 2q + 8 exchanged).
template <typename T>
__global__ void gemm_kernel(const T* a, const T* b, const T* bt, float* c, int M, int N, int K,
                            int variant) {
  __shared__ __align__(16) T As[16 * 24], Bs[16 * 8], Bts[8 * 24];
  const llada::mma::Lane ln(threadIdx.x);
  const int m0 = blockIdx.y * 16, n0 = blockIdx.x * 8;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int k0 = 0; k0 < K; k0 += 16) {
    for (int i = threadIdx.x; i < 16 * 16; i += 32)
      As[i / 16 * 24 + i % 16] = a[int64_t(m0 + i / 16) * K + k0 + i % 16];
    for (int i = threadIdx.x; i < 8 * 16; i += 32) {
      Bts[i / 16 * 24 + i % 16] = bt[int64_t(n0 + i / 16) * K + k0 + i % 16];
      Bs[i] = b[int64_t(k0 + i / 8) * N + n0 + i % 8];
    }
    __syncwarp();
    uint32_t fa[4], fb[2];
    llada::mma::load_a(fa, As, 24, ln);
    if (variant == 1) llada::mma::load_b_kmajor(fb, Bs, 8, ln);
    else llada::mma::load_b_nmajor(fb, Bts, 24, ln);
    if (variant == 2) std::swap(fa[1], fa[2]);
    llada::mma::mma_16816<T>(acc, fa, fb);
    __syncwarp();
  }
  float* out = c + int64_t(m0 + ln.g) * N + n0 + 2 * ln.q;
  out[0] = acc[0], out[1] = acc[1];
  out[8 * N] = acc[2], out[8 * N + 1] = acc[3];
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, int64_t variant) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) && a.scalar_type() == b.scalar_type());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(M % 16 == 0 && K % 16 == 0 && N % 8 == 0, "gemm: M, K multiples of 16, N of 8");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), bt = b.t().contiguous();
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(N / 8), static_cast<unsigned>(M / 16));
  const auto run = [&]<typename T>() {
    gemm_kernel<T><<<grid, 32>>>(reinterpret_cast<const T*>(ac.data_ptr()), reinterpret_cast<const T*>(bc.data_ptr()),
                                 reinterpret_cast<const T*>(bt.data_ptr()), c.data_ptr<float>(),
                                 static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                 static_cast<int>(variant));
  };
  if (a.scalar_type() == at::kHalf) run.template operator()<__half>();
  else run.template operator()<__nv_bfloat16>();
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c;
}

// ---- rounding ---------------------------------------------------------------------------------

// The bits of x rounded to bf16 and fp16: [n, 4] int16 = __float2bfloat16_rn, __float2half_rn,
// and the low halves of __floats2bfloat162_rn / __floats2half2_rn (through mma::pack).
__global__ void convert_kernel(const float* x, int16_t* out, int64_t n) {
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= n) return;
  const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
  const __half h = __float2half_rn(x[i]);
  const uint32_t pb = llada::mma::pack<__nv_bfloat16>(x[i], 0.f), ph = llada::mma::pack<__half>(0.f, x[i]);
  out[4 * i] = static_cast<int16_t>(__bfloat16_as_ushort(b));
  out[4 * i + 1] = static_cast<int16_t>(__half_as_ushort(h));
  out[4 * i + 2] = static_cast<int16_t>(pb & 0xffff);
  out[4 * i + 3] = static_cast<int16_t>(ph >> 16);
}

at::Tensor convert(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == at::kFloat && x.is_contiguous());
  at::Tensor out = at::empty({x.size(0), 4}, x.options().dtype(at::kShort));
  const int64_t n = x.size(0);
  if (n == 0) return out;
  convert_kernel<<<static_cast<unsigned>((n + 255) / 256), 256>>>(x.data_ptr<float>(), out.data_ptr<int16_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- warp collectives and barrier reductions ----------------------------------------------------

constexpr int kWarpCols = 14;

// For x [blocks * 64] int32, two warps per block; column j of out [blocks * 64, kWarpCols]:
//  0 __shfl_sync(x, (lane * 7 + 3) % 32)    1 __shfl_sync(x, lane + 5, width 8)
//  2 __shfl_up_sync(x, 3, width 8)          3 __shfl_down_sync(x, 5, width 16)
//  4 __shfl_xor_sync(x, 9)                  5 __shfl_xor_sync(x, 5, width 4)
//  6 __ballot_sync(x & 1)                   7 __any_sync(x > 90)       8 __all_sync(x >= 0)
//  9 __match_any_sync(x % 4)               10 __reduce_add_sync(x)    11 __reduce_max_sync(x)
// 12 __syncthreads_count(x & 1)            13 __syncthreads_or(x == 7) + 2 __syncthreads_and(x >= 0)
__global__ void warp_kernel(const int* x, int* out) {
  const int i = blockIdx.x * 64 + threadIdx.x, lane = threadIdx.x % 32;
  const int v = x[i];
  int* o = out + int64_t(i) * kWarpCols;
  o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32);
  o[1] = __shfl_sync(0xffffffffu, v, lane + 5, 8);
  o[2] = __shfl_up_sync(0xffffffffu, v, 3, 8);
  o[3] = __shfl_down_sync(0xffffffffu, v, 5, 16);
  o[4] = __shfl_xor_sync(0xffffffffu, v, 9);
  o[5] = __shfl_xor_sync(0xffffffffu, v, 5, 4);
  o[6] = static_cast<int>(__ballot_sync(0xffffffffu, v & 1));
  o[7] = __any_sync(0xffffffffu, v > 90);
  o[8] = __all_sync(0xffffffffu, v >= 0);
  o[9] = static_cast<int>(__match_any_sync(0xffffffffu, v % 4));
  o[10] = __reduce_add_sync(0xffffffffu, v);
  o[11] = __reduce_max_sync(0xffffffffu, v);
  o[12] = __syncthreads_count(v & 1);
  o[13] = __syncthreads_or(v == 7) + 2 * __syncthreads_and(v >= 0);
}

at::Tensor warp_ops(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) % 64 == 0 && x.scalar_type() == at::kInt && x.is_contiguous());
  at::Tensor out = at::empty({x.size(0), kWarpCols}, x.options());
  warp_kernel<<<static_cast<unsigned>(x.size(0) / 64), 64>>>(x.data_ptr<int>(), out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- deliberately broken kernels, one per check -------------------------------------------------

__global__ void planted_kernel(int kind, int* out) {
  __shared__ int s[64];
  extern __shared__ __align__(16) unsigned char dyn[];
  const int t = threadIdx.x, lane = t % 32;
  switch (kind) {
    case 0:  // fine: each thread its own slot, a barrier, then a neighbour's
      s[t] = t;
      __syncthreads();
      out[t] = s[(t + 1) % 64];
      break;
    case 1:  // write after write: two threads store to one slot
      s[t / 2] = t;
      __syncthreads();
      out[t] = s[t / 2];
      break;
    case 2:  // read of a slot no thread wrote
      out[t] = s[t];
      break;
    case 3:  // a read and a write of one slot by two threads, no barrier
      s[t] = t;
      __syncthreads();
      out[t] = s[(t + 1) % 64];
      s[t] = 0;
      break;
    case 4: {  // atomics on shared memory, then a plain read after the barrier: fine
      if (t == 0) s[0] = 0;
      __syncthreads();
      atomicAdd(&s[0], 1);
      __syncthreads();
      out[t] = s[0];
      break;
    }
    case 5:  // a plain read of a counter that others update atomically in the same interval
      if (t == 0) s[0] = 0;
      __syncthreads();
      atomicAdd(&s[0], 1);
      out[t] = s[0];
      break;
    case 6:  // in one warp, a __syncwarp orders the write before the read: fine
      if (t < 32) {
        if (lane == 0) s[0] = 42;
        __syncwarp();
        out[t] = s[0];
      }
      break;
    case 7:  // the same without the __syncwarp
      if (t < 32) {
        if (lane == 0) s[0] = 42;
        out[t] = s[0];
      }
      break;
    case 8:  // threads at two different barriers
      if (t < 32) __syncthreads();
      else __syncthreads();
      break;
    case 9:  // lane 0 waits at a barrier while its warp waits at a shuffle: a deadlock
      if (lane == 0) __syncthreads();
      else out[t] = __shfl_xor_sync(0xffffffffu, t, 1);
      break;
    case 10:  // a shuffle that reads an exited lane
      if (lane == 31) return;
      out[t] = __shfl_sync(0xffffffffu, t, 31);
      break;
    case 11:  // past the end of the dynamic shared memory (the launch gives 256 bytes)
      dyn[256 + t] = 1;
      break;
    case 12:
      __trap();
    case 13:  // fine: tickets from a shared counter, in the order the threads run
      if (t == 0) s[0] = 0;
      __syncthreads();
      out[t] = atomicAdd(&s[0], 1);
      break;
    // global memory (launched with two blocks)
    case 14:  // two blocks store to one word
      if (t == 0) out[0] = static_cast<int>(blockIdx.x);
      break;
    case 15:  // one thread stores, another loads, no barrier
      if (blockIdx.x == 1 && t == 1) out[1] = 5;
      if (blockIdx.x == 1 && t == 0) out[2] = out[1];
      break;
    case 16:  // the same with a barrier: fine
      if (blockIdx.x == 1 && t == 1) out[1] = 5;
      __syncthreads();
      if (blockIdx.x == 1 && t == 0) out[2] = out[1];
      break;
    case 17:  // atomics from every block, read by none: fine
      atomicAdd(&out[0], 1);
      break;
    case 18:  // a plain load of a counter that other blocks update atomically
      atomicAdd(&out[0], 1);
      if (blockIdx.x == 1 && t == 0) out[1] = out[0];
      break;
  }
}

at::Tensor planted(int64_t kind, int64_t blocks, int64_t threads, int64_t smem) {
  at::Tensor out = at::zeros({64}, at::dtype(at::kInt));
  planted_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), static_cast<size_t>(smem)>>>(
      static_cast<int>(kind), out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace llada_emu_test

TORCH_LIBRARY(llada_emu_test, m) {
  m.def("reverse(Tensor x, bool barrier) -> Tensor", &llada_emu_test::reverse);
  m.def("gemm(Tensor a, Tensor b, int variant) -> Tensor", &llada_emu_test::gemm);
  m.def("convert(Tensor x) -> Tensor", &llada_emu_test::convert);
  m.def("warp_ops(Tensor x) -> Tensor", &llada_emu_test::warp_ops);
  m.def("planted(int kind, int blocks, int threads, int smem) -> Tensor", &llada_emu_test::planted);
}
