#pragma once
// Warp- and block-wide reductions of any small value type (a float, an int, or a struct of
// running statistics), for the CUDA kernels of llada-kernels.
//
//   warp_reduce(v, op)                    every lane gets op over the warp's 32 values
//   block_reduce<kThreads>(v, op, id, s)  every thread gets op over the block's values
//
// op(a, b) must be associative and commutative (up to rounding): the butterfly combines
// lanes in an order that differs from lane to lane.
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace llada::cuda {

constexpr int kWarpSize = 32;

// __shfl_xor_sync of a trivially copyable T, one 32-bit word at a time.
template <typename T>
__device__ __forceinline__ T shfl_xor(const T& v, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) % 4 == 0,
                "shfl_xor moves whole 32-bit words");
  constexpr int kWords = sizeof(T) / 4;
  uint32_t w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], lane_mask);
  T out;
  memcpy(&out, w, sizeof(T));
  return out;
}

// Butterfly reduction: after log2(32) = 5 exchanges every lane holds op over the warp.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) v = op(v, shfl_xor(v, mask));
  return v;
}

// op over the values of a block of kThreads threads (a multiple of 32, at most 1024), returned
// to every thread. `smem` holds kThreads / 32 values of T. Every thread of the block must call
// it (it contains two barriers); the trailing barrier lets the caller reuse `smem` at once.
template <int kThreads, typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, const T& identity, T* smem) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "whole warps, at most 1024");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_reduce(v, op);
  if constexpr (kWarps > 1) {
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = warp_reduce(lane < kWarps ? smem[lane] : identity, op);
    __syncthreads();
  }
  return v;
}

}  // namespace llada::cuda
