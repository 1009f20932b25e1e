#pragma once
// The random-number contract shared by every llada-kernels backend.
//
// Triton (llada_kernels/triton/_random.py), CUDA and the C++ CPU kernels draw the same bits
// for the same seed, so their samples agree up to the last ulp of a log. The reference
// backend uses torch.rand in float64, as LLaDA's generate.py does, and agrees in
// distribution only.
//
// Generator: Philox4x32-10 (Salmon et al., SC'11), key = the 64-bit seed (low word k0,
// high word k1), the same rounds and key schedule as triton.language.random.philox.
//
// Streams, for position r = b * L + l (64-bit) and vocabulary id v:
//   Gumbel noise of (r, v):    counter (v >> 1, r_lo, r_hi, 0); element v takes words
//                              2*(v & 1) (high half) and 2*(v & 1) + 1 (low half) of the
//                              output as one 64-bit draw, so one Philox call feeds two ids.
//   random remasking of r:     counter (0, r_lo, r_hi, 1); word 0 >> 8 gives u in [0, 1)
//                              with 24 bits, the precision of LLaDA's float32 torch.rand.
//
// Gumbel noise from a 64-bit draw keeps 53 bits, as a float64 uniform does:
//   n = bits >> 11,  u = (n + 1/2) 2^-53 in (0, 1),  E = -log u,  g = -log E.
// For u < 1/2, E = -log(u) in fp32 is accurate. For u >= 1/2 the complement
// w = 1 - u = (2^53 - 1 - n + 1/2) 2^-53 is exact before rounding and E = -log1p(-w).
// Computing 1 - u in 32-bit floats would round w to 0 below 2^-24 and cap g near 16.6; this
// keeps the tail of float64 noise, g up to about 37.4 (LLaDA's float64 torch.rand reaches
// 36.7), and down to -log(37.4) on the other side.
//
// The noisy logit is l + T * g in fp32. Backends may contract it to an fma (the C++ CPU kernel
// does; the CUDA kernel rounds twice), and their logf/log1pf may differ in the last ulp, so
// samples agree except where two noisy logits of a row lie within an ulp of each other.
#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace llada {

struct Philox4x32 {
  uint32_t w[4];
};

LLADA_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

LLADA_HD Philox4x32 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                  uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// The two 64-bit Gumbel draws of ids 2j and 2j + 1 at position r.
LLADA_HD void gumbel_bits_pair(uint64_t seed, int64_t r, int64_t j, uint64_t& even,
                               uint64_t& odd) {
  const Philox4x32 o = philox4x32_10(seed, static_cast<uint32_t>(j), static_cast<uint32_t>(r),
                                     static_cast<uint32_t>(static_cast<uint64_t>(r) >> 32), 0u);
  even = (static_cast<uint64_t>(o.w[0]) << 32) | o.w[1];
  odd = (static_cast<uint64_t>(o.w[2]) << 32) | o.w[3];
}

// Standard Gumbel noise from a 64-bit draw (see the header comment). Uses the precise
// logf/log1pf: do not build this with fast-math, whose log loses log1p's accuracy.
LLADA_HD float gumbel_from_bits(uint64_t bits) {
  const uint64_t n = bits >> 11;                    // 53 random bits
  const uint64_t half = uint64_t(1) << 52;          // u = 1/2
  const float scale = 1.1102230246251565e-16f;      // 2^-53
  float e;                                          // E = -log(u) ~ Exp(1)
  if (n < half) {
    e = -logf((static_cast<float>(n) + 0.5f) * scale);
  } else {
    const uint64_t m = (half << 1) - 1 - n;         // 1 - u = (m + 1/2) 2^-53
    e = -log1pf(-(static_cast<float>(m) + 0.5f) * scale);
  }
  return -logf(e);
}

// Uniform [0, 1) with 24 bits for "random" remasking of position r.
LLADA_HD float remask_uniform(uint64_t seed, int64_t r) {
  const Philox4x32 o = philox4x32_10(seed, 0u, static_cast<uint32_t>(r),
                                     static_cast<uint32_t>(static_cast<uint64_t>(r) >> 32), 1u);
  return static_cast<float>(o.w[0] >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace llada
