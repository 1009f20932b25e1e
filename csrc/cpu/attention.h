#pragma once
// Attention with a structured mask on the CPU: what the forward (attention_fwd.cpp) and the
// backward (attention_bwd.cpp) share. Both are CPU kernel files, compiled once per capability
// (csrc/isa.h), so everything here lands in each copy's namespace.
//
// Notation, per (batch b, query head h, KV head h / G):
//   S = scale Q K^T, masked: S_ij = -inf where query i does not see key j
//   P = exp(S - lse),  lse_i = log sum_j exp(S_ij),  O = P V
// The mask (csrc/ops.cpp): query i sees key j iff qdoc(i) == kdoc(j) and lo(j) <= level(i) <= hi(j).
//
// Matrix products go through ATen's CPU BLAS entry point at::native::cpublas::brgemm: oneDNN's
// JIT micro-kernels (AVX2, AVX-512, AMX) where ATen has them, MKL (or ATen's own loops)
// otherwise. fp32 and fp16 inputs are multiplied in fp32 (fp16 widened as tiles are packed);
// bf16 inputs in bf16 with fp32 accumulation where the CPU has bf16 dot products
// (AVX512-BF16 or AMX) and the AVX512 copy runs, in fp32 elsewhere. Our code does the rest:
// packing tiles, the masks, the online softmax, and which tiles to compute.
//
// Tiles. Per (query tile, key tile) the mask gives one of three kinds, from the tiles' min/max
// (conservative: unsorted ids stay correct, only less is skipped):
//   skip     no query of the tile sees a key of the tile: never computed, forward or backward
//   full     every query sees every key: no per-element mask
//   partial  the per-element rule
// A key tile that runs past Lk is never full: its missing keys are masked.
//
// Exactness at huge scores. The backward recomputes S with the same operands and the same
// products as the forward (Q packed alike in both, same reduction order, the scale applied alike),
// and
// every exponent is formed as (s - m) or (s - lse) first, in nats, then scaled to base 2: when one
// score dominates a row, s - lse is exactly 0 there in both passes (no rounding of s log2(e)
// against lse log2(e)). The backward clamps the exponent at 0 (P <= 1).

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "isa.h"

#if !defined(CPUBLAS_BRGEMM_F32F32F32) || !defined(CPUBLAS_BRGEMM_BF16BF16F32)
#error "llada attention needs at::native::cpublas::brgemm for fp32 and bf16 (this torch lacks it)"
#endif

namespace llada::attn {
namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kW = Vec::size();  // fp32 lanes
constexpr int64_t kBN = 64;          // key tile, forward and backward (a multiple of 2 kW)
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ---- products ----------------------------------------------------------------------------

// C [M x N] (+)= A [M x K] B [K x N], accumulated in fp32. A is row-major (lda); B is row-major
// (ldb) in fp32, or in bf16 VNNI pairs: element (k, n) at B[((k / 2) ldb + n) 2 + k % 2], K even.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}
inline void gemm(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                 const at::BFloat16* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/true);
}

// Where element (k, n) of a B operand [K x N] with leading dimension ld lives.
template <typename C>
inline int64_t b_index(int64_t k, int64_t n, int64_t ld) {
  if constexpr (std::is_same_v<C, float>) {
    return k * ld + n;
  } else {
    return ((k >> 1) * ld + n) * 2 + (k & 1);
  }
}
// The reduction dimension is padded to a multiple of this (VNNI pairs).
template <typename C>
constexpr int64_t kPair = std::is_same_v<C, float> ? 1 : 2;

// Whether bf16 inputs are multiplied in bf16 here: the AVX512 copy, on a CPU with bf16 dot
// products, with oneDNN enabled (torch.backends.mkldnn) and its VNNI brgemm answering.
inline bool bf16_products() {
#if defined(CPU_CAPABILITY_AVX512)
  if (!isa::cpu_has_bf16_dot() || !at::globalContext().userEnabledMkldnn()) return false;
  static const bool answers = [] {
    try {
      at::BFloat16 a[2 * 2] = {}, b[2 * 16] = {};
      float c[2 * 16];
      at::native::cpublas::brgemm(2, 16, 2, 2, 16, 16, false, a, b, c, /*is_vnni=*/true);
      at::native::cpublas::brgemm_release(true);
      return true;
    } catch (const c10::Error&) {  // oneDNN capped below AVX-512 (ONEDNN_MAX_CPU_ISA), say
      return false;
    }
  }();
  return answers;
#else
  return false;
#endif
}

// Gives the AMX tile state back when a thread is done with bf16 products (a no-op elsewhere).
template <typename C>
inline void release_products() {
  if constexpr (!std::is_same_v<C, float>) at::native::cpublas::brgemm_release(true);
}

// ---- tensors, tiles and packing ----------------------------------------------------------

// A [B, H, L, D] tensor with unit stride along D, read row by row.
template <typename T>
struct Rows {
  T* data;
  int64_t sb, sh, sl;
  explicit Rows(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  T* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

struct Dims {
  int64_t B, Hq, Hkv, G, Lq, Lk, D;
  Dims(const at::Tensor& q, const at::Tensor& k)
      : B(q.size(0)), Hq(q.size(1)), Hkv(k.size(1)), G(q.size(1) / k.size(1)), Lq(q.size(2)),
        Lk(k.size(2)), D(q.size(3)) {}
};

// x in the compute type, times scale (1 for everything but Q, whose packings all carry the
// softmax scale: the forward and the backward then form the very same scores).
template <typename C, typename T>
inline C to_compute(T x, float scale) {
  return static_cast<C>(scale * static_cast<float>(x));
}

// An A operand [rows_pad x ld] (row-major): rows r0 .. r0 + rows of (b, h), zero elsewhere.
template <typename C, typename T>
void pack_a(C* dst, int64_t ld, const Rows<const T>& src, int64_t b, int64_t h, int64_t r0,
            int64_t rows, int64_t rows_pad, int64_t D, float scale = 1.f) {
  std::fill(dst, dst + rows_pad * ld, C(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src.row(b, h, r0 + r);
    C* out = dst + r * ld;
    for (int64_t d = 0; d < D; ++d) out[d] = to_compute<C>(in[d], scale);
  }
}

// An A operand [D x ld], the transpose of rows r0 .. r0 + rows: dst[d ld + r] = row r [d].
template <typename C, typename T>
void pack_a_transposed(C* dst, int64_t ld, const Rows<const T>& src, int64_t b, int64_t h,
                       int64_t r0, int64_t rows, int64_t D) {
  std::fill(dst, dst + D * ld, C(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src.row(b, h, r0 + r);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = to_compute<C>(in[d], 1.f);
  }
}

// A B operand [K x N] whose K runs along the rows: element (r, d) = row r [d], K = rows_pad
// (zero past rows), N = ld = D.
template <typename C, typename T>
void pack_b_rows(C* dst, const Rows<const T>& src, int64_t b, int64_t h, int64_t r0,
                 int64_t rows, int64_t rows_pad, int64_t D, float scale = 1.f) {
  std::fill(dst, dst + rows_pad * D, C(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src.row(b, h, r0 + r);
    for (int64_t d = 0; d < D; ++d) dst[b_index<C>(r, d, D)] = to_compute<C>(in[d], scale);
  }
}

// A B operand [K x N] whose K runs along D: element (d, r) = row r [d], K = Kd (zero past D),
// N = ld (zero past rows).
template <typename C, typename T>
void pack_b_cols(C* dst, int64_t ld, const Rows<const T>& src, int64_t b, int64_t h, int64_t r0,
                 int64_t rows, int64_t D, int64_t Kd, float scale = 1.f) {
  std::fill(dst, dst + Kd * ld, C(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src.row(b, h, r0 + r);
    for (int64_t d = 0; d < D; ++d) dst[b_index<C>(d, r, ld)] = to_compute<C>(in[d], scale);
  }
}

// Stores n (a multiple of 2 kW) fp32 values as C.
template <typename C>
inline void store_row(C* dst, const float* src, int64_t n) {
  if constexpr (std::is_same_v<C, float>) {
    if (dst != src) std::copy(src, src + n, dst);
  } else {
    for (int64_t j = 0; j < n; j += 2 * kW) {
      at::vec::convert_from_float<C>(Vec::loadu(src + j), Vec::loadu(src + j + kW)).store(dst + j);
    }
  }
}

// ---- the mask ----------------------------------------------------------------------------

// q_mask [B, 2, Lq] and k_mask [B, 3, Lk], int32, contiguous (the entry points make them when
// the caller gives none: every key visible).
struct Mask {
  const int32_t* q;
  const int32_t* k;
  int64_t Lq, Lk;
  const int32_t* qdoc(int64_t b) const { return q + b * 2 * Lq; }
  const int32_t* level(int64_t b) const { return q + b * 2 * Lq + Lq; }
  const int32_t* kdoc(int64_t b) const { return k + b * 3 * Lk; }
  const int32_t* lo(int64_t b) const { return k + b * 3 * Lk + Lk; }
  const int32_t* hi(int64_t b) const { return k + b * 3 * Lk + 2 * Lk; }
};

struct QStats {  // over a query tile's rows
  int32_t doc_min, doc_max, level_min, level_max;
};
struct KStats {  // over a key tile's keys (those < Lk)
  int32_t doc_min, doc_max, lo_min, lo_max, hi_min, hi_max;
  bool runs_past_end;  // the tile has fewer than kBN keys
};
enum class Kind : uint8_t { kSkip, kFull, kPartial };

inline Kind classify(const QStats& q, const KStats& k) {
  if (q.doc_max < k.doc_min || k.doc_max < q.doc_min || q.level_max < k.lo_min ||
      q.level_min > k.hi_max)
    return Kind::kSkip;
  if (!k.runs_past_end && q.doc_min == q.doc_max && k.doc_min == k.doc_max &&
      q.doc_min == k.doc_min && k.lo_max <= q.level_min && q.level_max <= k.hi_min)
    return Kind::kFull;
  return Kind::kPartial;
}

// Per (b, query tile of `tile` rows): the tile's min/max.
inline std::vector<QStats> query_stats(const Mask& m, int64_t B, int64_t tile) {
  const int64_t tiles = ceil_div(m.Lq, tile);
  std::vector<QStats> out(B * tiles);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * tile, r1 = std::min(m.Lq, r0 + tile);
      const auto [d0, d1] = std::minmax_element(m.qdoc(b) + r0, m.qdoc(b) + r1);
      const auto [l0, l1] = std::minmax_element(m.level(b) + r0, m.level(b) + r1);
      out[b * tiles + t] = {*d0, *d1, *l0, *l1};
    }
  }
  return out;
}

// The key side of the mask in kBN-key tiles: per (b, tile) the stats, and copies of kdoc, lo
// and hi padded to whole tiles, the missing keys never visible (lo = 1 > hi = 0).
struct KeyTiles {
  int64_t tiles;
  std::vector<KStats> stats;             // [B * tiles]
  std::vector<int32_t> doc, lo, hi;      // [B * tiles * kBN]
  const int32_t* tile_doc(int64_t b, int64_t t) const { return doc.data() + (b * tiles + t) * kBN; }
  const int32_t* tile_lo(int64_t b, int64_t t) const { return lo.data() + (b * tiles + t) * kBN; }
  const int32_t* tile_hi(int64_t b, int64_t t) const { return hi.data() + (b * tiles + t) * kBN; }
};

inline KeyTiles key_tiles(const Mask& m, int64_t B) {
  KeyTiles kt;
  kt.tiles = ceil_div(m.Lk, kBN);
  const int64_t n = B * kt.tiles * kBN;
  kt.stats.resize(B * kt.tiles);
  kt.doc.assign(n, 0);
  kt.lo.assign(n, 1);
  kt.hi.assign(n, 0);
  for (int64_t b = 0; b < B; ++b) {
    std::copy(m.kdoc(b), m.kdoc(b) + m.Lk, kt.doc.begin() + b * kt.tiles * kBN);
    std::copy(m.lo(b), m.lo(b) + m.Lk, kt.lo.begin() + b * kt.tiles * kBN);
    std::copy(m.hi(b), m.hi(b) + m.Lk, kt.hi.begin() + b * kt.tiles * kBN);
    for (int64_t t = 0; t < kt.tiles; ++t) {
      const int64_t j0 = t * kBN, j1 = std::min(m.Lk, j0 + kBN);
      const auto [d0, d1] = std::minmax_element(m.kdoc(b) + j0, m.kdoc(b) + j1);
      const auto [a0, a1] = std::minmax_element(m.lo(b) + j0, m.lo(b) + j1);
      const auto [h0, h1] = std::minmax_element(m.hi(b) + j0, m.hi(b) + j1);
      kt.stats[b * kt.tiles + t] = {*d0, *d1, *a0, *a1, *h0, *h1, j1 - j0 < kBN};
    }
  }
  return kt;
}

// ---- arithmetic --------------------------------------------------------------------------

// fp32 products take the softmax scale in the packed Q (one rounding of scale q, as eager's q
// @ k then * scale has one); bf16 products apply it to the fp32 scores instead, as
// FlashAttention does, so that scale q is not rounded to bf16.
template <typename C>
constexpr bool kScaleInQ = std::is_same_v<C, float>;

// v, hidden from the compiler: a product stored through it is never fused with a following
// subtraction into one rounding (the scores must come out of the forward and the backward
// alike). Only the AVX512 copy multiplies in bf16, so only its registers need it.
inline Vec opaque(Vec v) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  __m512 r = v;
  asm("" : "+v"(r));
  return Vec(r);
#else
  return v;
#endif
}

// 2^x for x <= 0: within 2 ulp (1.7 measured) for normal results, x >= -126; exactly 0 for
// x < -126.5 (-inf included). 2^x = 2^n 2^f with n = round(x), f in [-1/2, 1/2], 2^f a degree-6
// polynomial (a relative-error fit, 2.6e-9) and 2^n written into the exponent field: clamping x
// at -127 makes that field 0, so 2^n is +0 and no select is needed. Estrin's scheme: a
// dependency chain of four instead of Horner's six.
inline Vec exp2v(Vec x) {
  const Vec xc = at::vec::maximum(x, Vec(-127.f));
  const Vec n = xc.round();
  const Vec f = xc - n;
  const Vec f2 = f * f, f4 = f2 * f2;
  const Vec c01 = at::vec::fmadd(Vec(6.931471824645996e-1f), f, Vec(1.f));
  const Vec c23 = at::vec::fmadd(Vec(5.550328642129898e-2f), f, Vec(2.4022647738456726e-1f));
  Vec c46 = at::vec::fmadd(Vec(1.339997397735715e-3f), f, Vec(9.618470445275307e-3f));
  c46 = at::vec::fmadd(Vec(1.5350864850915968e-4f), f2, c46);
  const Vec p = at::vec::fmadd(f4, c46, at::vec::fmadd(f2, c23, c01));
  const IVec biased = at::vec::convert_to_int_of_same_size(n) + IVec(127);  // 0 at n = -127
  return p * at::vec::cast<float>(biased << IVec(23));
}

inline float hmax(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, v);
}

inline float hsum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v);
}

// ---- scheduling --------------------------------------------------------------------------

// Runs body(state, unit) for every unit in [0, n) on the intra-op threads, each thread taking
// the next unit when it finishes one (masks make units unequal). Each thread makes its state
// (scratch buffers) once with make_state() and calls done() at the end. Units must be
// independent: results do not depend on which thread runs which unit.
template <typename MakeState, typename Body, typename Done>
void for_each_unit(int64_t n, const MakeState& make_state, const Body& body, const Done& done) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t u = next.fetch_add(1); u < n; u = next.fetch_add(1)) body(state, u);
    done();
  });
}

// ---- entry-point helpers -----------------------------------------------------------------

inline void check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const std::optional<at::Tensor>& q_mask,
                         const std::optional<at::Tensor>& k_mask) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->stride(3) == 1, op,
                " (cpu): q, k, v must be 4-d CPU tensors with unit stride along D");
  }
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              " (cpu): q, k, v must have one dtype");
  const int64_t B = q.size(0), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == k.size(1) && v.size(2) == Lk &&
                  k.size(3) == D && v.size(3) == D,
              op, " (cpu): k and v must be [B, Hkv, Lk, D] with q's B and D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op,
              " (cpu): Hq must be a multiple of Hkv");
  TORCH_CHECK(D >= 1 && D <= 256, op, " (cpu): the head dimension must be in [1, 256]; got ", D);
  TORCH_CHECK(q_mask.has_value() == k_mask.has_value(), op,
              " (cpu): q_mask and k_mask must both be given or both be None");
  if (q_mask) {
    for (const auto& [m, rows, L, name] :
         {std::tuple{&*q_mask, 2, Lq, "q_mask"}, std::tuple{&*k_mask, 3, Lk, "k_mask"}}) {
      TORCH_CHECK(m->device().is_cpu() && m->scalar_type() == at::kInt && m->is_contiguous() &&
                      m->dim() == 3 && m->size(0) == B && m->size(1) == rows && m->size(2) == L,
                  op, " (cpu): ", name, " must be a contiguous int32 CPU tensor [", B, ", ", rows,
                  ", ", L, "]; got ", m->scalar_type(), " ", m->sizes());
    }
  }
}

// The masks to use: the caller's, or "every key visible" (doc 0, level 0, [0, INT32_MAX]).
struct MaskTensors {
  at::Tensor q, k;
  Mask view() const { return {q.const_data_ptr<int32_t>(), k.const_data_ptr<int32_t>(), q.size(2), k.size(2)}; }
};

inline MaskTensors masks_or_all(const std::optional<at::Tensor>& q_mask,
                                const std::optional<at::Tensor>& k_mask, int64_t B, int64_t Lq,
                                int64_t Lk) {
  if (q_mask) return {*q_mask, *k_mask};
  const auto opts = at::TensorOptions().dtype(at::kInt);
  at::Tensor k = at::zeros({B, 3, Lk}, opts);
  k.select(1, 2).fill_(std::numeric_limits<int32_t>::max());
  return {at::zeros({B, 2, Lq}, opts), k};
}

}  // namespace CPU_CAPABILITY
}  // namespace llada::attn
