#pragma once
// A thin wrapper over one tensor-core instruction, mma.sync.aligned.m16n8k16 (sm_80+):
// D[16 x 8] += A[16 x 16] B[16 x 8], A and B fp16 or bf16, accumulation in fp32, one warp.
//
// Fragments: lane = 4 g + q (g = lane / 4 in 0..7, q = lane % 4). A 32-bit register holds two
// consecutive elements along a row of A, a column of B, or a row of C (lower index in the
// low half).
//   A  a[0] = A[g][2q, 2q+1]   a[1] = A[g+8][2q, 2q+1]   a[2] = A[g][2q+8, +9]   a[3] = A[g+8][2q+8, +9]
//   B  b[0] = B[2q, 2q+1][g]   b[1] = B[2q+8, 2q+9][g]
//   C  c[0], c[1] = C[g][2q, 2q+1]    c[2], c[3] = C[g+8][2q, 2q+1]
// So the C fragments of two neighbouring 16x8 tiles are, once packed to 16 bits, the A
// fragment of their 16x16 union: attention keeps P in registers between its two products.
//
// The loaders read shared memory with plain C++ (no ldmatrix), so the same code runs on the
// host emulation of csrc/emu, where mma_16816 is llada_emu::mma_m16n8k16.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace llada::mma {

struct Lane {
  int g, q;
  __device__ explicit Lane(int lane) : g(lane >> 2), q(lane & 3) {}
};

// Two floats rounded to T (to nearest even) in one register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ uint32_t load2(const T* p) {  // p[0], p[1]; p 4-byte aligned
  return *reinterpret_cast<const uint32_t*>(p);
}

// A fragment of the 16x16 tile at s, row-major with row stride ld (elements).
template <typename T>
__device__ __forceinline__ void load_a(uint32_t a[4], const T* s, int ld, Lane l) {
  const T* r0 = s + l.g * ld + 2 * l.q;
  const T* r1 = r0 + 8 * ld;
  a[0] = load2(r0);
  a[1] = load2(r1);
  a[2] = load2(r0 + 8);
  a[3] = load2(r1 + 8);
}

// B fragment of a 16x8 (k x n) tile stored n-major, B[k][n] = s[n * ld + k]: the K of Q K^T.
template <typename T>
__device__ __forceinline__ void load_b_nmajor(uint32_t b[2], const T* s, int ld, Lane l) {
  const T* r = s + l.g * ld + 2 * l.q;
  b[0] = load2(r);
  b[1] = load2(r + 8);
}

// B fragment of a 16x8 (k x n) tile stored k-major, B[k][n] = s[k * ld + n]: the V of P V.
template <typename T>
__device__ __forceinline__ void load_b_kmajor(uint32_t b[2], const T* s, int ld, Lane l) {
  const uint16_t* r = reinterpret_cast<const uint16_t*>(s) + 2 * l.q * ld + l.g;
  b[0] = uint32_t(r[0]) | uint32_t(r[ld]) << 16;
  b[1] = uint32_t(r[8 * ld]) | uint32_t(r[9 * ld]) << 16;
}

// c += a b
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(LLADA_CUDA_EMU)
  ::llada_emu::mma_m16n8k16(c, a, b, std::is_same_v<T, __half>);  // the host emulation (csrc/emu)
#else
  __trap();  // tensor cores of this shape need sm_80
#endif
}

// Reductions over the 4 lanes (q = 0..3) that share a row of a C fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace llada::mma
