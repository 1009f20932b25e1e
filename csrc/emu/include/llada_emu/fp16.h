#pragma once
// __half and __nv_bfloat16 for the host emulation (csrc/emu/cuda_emu.h): storage, conversions
// rounded to nearest even as the hardware's cvt.rn does (NaN becomes the canonical 0x7fff), and
// the few intrinsics the kernels use. Arithmetic rounds the exact (or fp64) result once.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace llada_emu {

// x rounded to nearest even in a binary format with `mant` fraction bits and minimum normal
// exponent `emin` (binary16: 10, -14; bfloat16: 7, -126), as its 16-bit encoding.
inline uint16_t round_rne(double x, int mant, int emin) {
  if (std::isnan(x)) return 0x7fff;
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const uint32_t inf = uint32_t(3 - 2 * emin) << mant;  // exponent field all ones: 2 emax + 1
  const double a = std::fabs(x);
  if (std::isinf(a)) return sign | inf;
  if (a == 0) return sign;
  int e;
  std::frexp(a, &e);                              // a = f 2^e, f in [0.5, 1)
  const int lead = std::max(e - 1, emin);          // the exponent of the quantum's binade
  const double q = std::nearbyint(std::ldexp(a, mant - lead));  // exact scaling, then RNE
  // (lead - emin) << mant + q is the encoding: for lead > emin q carries the implicit bit, which
  // adds one to the exponent field; a carry out of the binade (q = 2^(mant+1)) does the same.
  const uint32_t bits = (uint32_t(lead - emin) << mant) + static_cast<uint32_t>(q);
  return sign | static_cast<uint16_t>(bits >= inf ? inf : bits);
}

inline double decode(uint16_t h, int mant, int emin) {
  const bool neg = h & 0x8000;
  const uint32_t field = (h & 0x7fff) >> mant, frac = h & ((1u << mant) - 1);
  const uint32_t all_ones = (1u << (15 - mant)) - 1;
  double v;
  if (field == all_ones) v = frac ? NAN : INFINITY;
  else if (field == 0) v = std::ldexp(double(frac), emin - mant);
  else v = std::ldexp(double(frac | (1u << mant)), int(field) - 1 + emin - mant);
  return neg ? -v : v;
}

}  // namespace llada_emu

#define LLADA_EMU_HALF_TYPE(T, MANT, EMIN)                                                      \
  struct __align__(2) T {                                                                       \
    unsigned short __x;                                                                         \
    T() = default;                                                                              \
    T(double v) : __x(llada_emu::round_rne(v, MANT, EMIN)) {}                                   \
    T(float v) : __x(llada_emu::round_rne(v, MANT, EMIN)) {}                                    \
    T(int v) : __x(llada_emu::round_rne(v, MANT, EMIN)) {}                                      \
    T(unsigned v) : __x(llada_emu::round_rne(v, MANT, EMIN)) {}                                 \
    T(long long v) : __x(llada_emu::round_rne(static_cast<double>(v), MANT, EMIN)) {}           \
    operator float() const { return static_cast<float>(llada_emu::decode(__x, MANT, EMIN)); }   \
    static T from_bits(unsigned short b) { T t; t.__x = b; return t; }                          \
  };                                                                                            \
  inline T operator+(T a, T b) { return T(double(float(a)) + double(float(b))); }               \
  inline T operator-(T a, T b) { return T(double(float(a)) - double(float(b))); }               \
  inline T operator*(T a, T b) { return T(double(float(a)) * double(float(b))); }               \
  inline T operator/(T a, T b) { return T(double(float(a)) / double(float(b))); }               \
  inline T operator-(T a) { return T::from_bits(a.__x ^ 0x8000); }                              \
  inline bool operator==(T a, T b) { return float(a) == float(b); }                             \
  inline bool operator!=(T a, T b) { return float(a) != float(b); }                             \
  inline bool operator<(T a, T b) { return float(a) < float(b); }                               \
  inline bool operator>(T a, T b) { return float(a) > float(b); }                               \
  inline bool operator<=(T a, T b) { return float(a) <= float(b); }                             \
  inline bool operator>=(T a, T b) { return float(a) >= float(b); }

LLADA_EMU_HALF_TYPE(__half, 10, -14)
LLADA_EMU_HALF_TYPE(__nv_bfloat16, 7, -126)
#undef LLADA_EMU_HALF_TYPE

struct __align__(4) __half2 { __half x, y; };
struct __align__(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

// ---- fp16 --------------------------------------------------------------------------------------
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__half(lo), __half(hi)}; }
inline __half2 __float22half2_rn(float2 v) { return {__half(v.x), __half(v.y)}; }
inline __half2 __float2half2_rn(float f) { return {__half(f), __half(f)}; }
inline __half2 __halves2half2(__half lo, __half hi) { return {lo, hi}; }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short b) { return __half::from_bits(b); }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }

// ---- bf16 --------------------------------------------------------------------------------------
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return {__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float f) { return {__nv_bfloat16(f), __nv_bfloat16(f)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return {lo, hi}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16::from_bits(b); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
