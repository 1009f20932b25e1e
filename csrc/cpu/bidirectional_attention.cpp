// Bidirectional (non-causal) attention on the CPU: a tiled, online-softmax forward and a
// backward that recomputes the probabilities from the saved log-sum-exp.
//
// Notation, per (batch b, query head h, KV head h / G):
//   S = scale * Q K^T + bias        bias[j] = 0 if key j is attended, -inf if padded
//   P = exp(S - lse),  lse_i = log sum_j exp(S_ij),  O = P V
// Forward (FlashAttention-2 order): a query tile of BM rows walks the key tiles of BN keys,
// keeping per row the running max m, the running sum l and an unnormalised accumulator:
//   m' = max(m, rowmax S),  l' = l e^(m - m') + rowsum e^(S - m'),  O' = O e^(m - m') + e^(S - m') V
// and ends with O / l and lse = m + log l. A row with no key (l = 0) gets O = 0, lse = +inf.
// The forward works in base 2: Q is packed with scale * log2(e), so S, m and log l are in
// bits and every exponential is exp2 (exp2v below, one polynomial, no table); lse is turned
// back into nats once per row. The backward evaluates e^x as exp2v(x log2 e) with one FMA.
// Backward, with delta_i = sum_d dO_id O_id:
//   dP = dO V^T,  dS = P * (dP - delta),  dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K
// in one pass of five products per tile pair, by KV head: see backward_kernel. Outputs are
// owned, never shared (no atomics, deterministic).
//
// Extra memory is O(Lk D) per thread (the forward packs one KV head at a time; the backward
// packs a chunk of one head's keys), plus delta [B, Hq, Lq] and, when there are fewer KV heads
// than threads, fp32 partial dQs: never Lq x Lk. Every tile is converted to fp32 as it is
// packed; the products run in one register-blocked fp32 kernel on at::vec::Vectorized (FMA).
// Tiles are zero-padded to whole register columns, so the inner loops have no tails. Key tiles
// whose keys are all padded are skipped.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace llada {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();      // fp32 lanes
constexpr int kMR = 6;                   // register block: up to kMR rows x kNV vectors, i.e.
constexpr int kNV = 2;                   // 12 accumulators, enough to hide the FMA latency
constexpr int64_t kNB = kNV * kW;        // register block width (columns)
constexpr int64_t kBM = 64;              // query tile of the backward (a multiple of kNB)
constexpr int64_t kBN = 64;              // key tile (a multiple of kNB)
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[MR x kNB] (+)= A[MR x K] B[K x kNB], fp32, B and C row-major; A row-major, or stored
// transposed (element (r, k) at A[k * lda + r]) with kTransA. Per k: kNV loads of B, MR
// broadcasts of A, MR * kNV independent FMAs.
template <int MR, bool kTransA = false>
inline void micro_kernel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                         int64_t ldc, int64_t K, bool accumulate) {
  Vec acc[MR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kNV; ++c)
      acc[r][c] = accumulate ? Vec::loadu(C + r * ldc + c * kW) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec b[kNV];
#pragma GCC unroll 4
    for (int c = 0; c < kNV; ++c) b[c] = Vec::loadu(B + k * ldb + c * kW);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec a(kTransA ? A[k * lda + r] : A[r * lda + k]);
#pragma GCC unroll 4
      for (int c = 0; c < kNV; ++c) acc[r][c] = at::vec::fmadd(a, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kNV; ++c) acc[r][c].store(C + r * ldc + c * kW);
}

// C[M x N] (+)= op(A)[M x K] B[K x N], op(A) = A or, with kTransA, the transpose of a row-major
// [K x M] A. N is a multiple of kNB (the tiles are padded); any M: whole kMR-row blocks, then
// one narrower block for the remainder.
template <bool kTransA = false>
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const auto rows_at = [&](int64_t i) { return kTransA ? A + i : A + i * lda; };
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR)
    for (int64_t j = 0; j < N; j += kNB)
      micro_kernel<kMR, kTransA>(rows_at(i), lda, B + j, ldb, C + i * ldc + j, ldc, K,
                                 accumulate);
  if (i == M) return;
  for (int64_t j = 0; j < N; j += kNB) {
    const float* a = rows_at(i);
    float* c = C + i * ldc + j;
    switch (M - i) {
      case 1: micro_kernel<1, kTransA>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      case 2: micro_kernel<2, kTransA>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      case 3: micro_kernel<3, kTransA>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      case 4: micro_kernel<4, kTransA>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
      default: micro_kernel<5, kTransA>(a, lda, B + j, ldb, c, ldc, K, accumulate); break;
    }
  }
}

// A [B, H, L, D] tensor with unit stride along D, read row by row.
template <typename T>
struct Rows {
  T* data;
  int64_t sb, sh, sl;
  Rows(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  T* row(int64_t b, int64_t h, int64_t l) const { return data + b * sb + h * sh + l * sl; }
};

// dst[r * ld + d] = scale * src row (r0 + r), for r < rows; zero elsewhere in [rows_pad x ld].
template <typename T>
void pack_rows(float* dst, int64_t ld, const Rows<const T>& src, int64_t b, int64_t h,
               int64_t r0, int64_t rows, int64_t rows_pad, int64_t D, float scale) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    float* out = dst + r * ld;
    if (r < rows) {
      const T* in = src.row(b, h, r0 + r);
      for (int64_t d = 0; d < D; ++d) out[d] = scale * static_cast<float>(in[d]);
      std::fill(out + D, out + ld, 0.f);
    } else {
      std::fill(out, out + ld, 0.f);
    }
  }
}

// The transpose: dst[d * ld + r] = scale * src row (r0 + r) [d]; zero-padded to [D_pad x ld].
template <typename T>
void pack_cols(float* dst, int64_t ld, const Rows<const T>& src, int64_t b, int64_t h,
               int64_t r0, int64_t rows, int64_t D, int64_t D_pad, float scale) {
  std::fill(dst, dst + D_pad * ld, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src.row(b, h, r0 + r);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = scale * static_cast<float>(in[d]);
  }
}

// bias[j] = 0 for an attended key n0 + j < Lk, -inf otherwise (j < kBN). Returns the count.
int64_t key_bias(float* bias, const bool* mask_row, int64_t n0, int64_t Lk) {
  int64_t valid = 0;
  for (int64_t j = 0; j < kBN; ++j) {
    const bool on = n0 + j < Lk && (mask_row == nullptr || mask_row[n0 + j]);
    bias[j] = on ? 0.f : -kInf;
    valid += on;
  }
  return valid;
}

// 2^x for x <= 127: within 2 ulp (1.7 measured) for normal results, x >= -126; exactly 0
// for x < -126.5 (-inf included: padded keys get no weight). 2^x = 2^n 2^f with n = round(x),
// f in [-1/2, 1/2], 2^f a degree-6 polynomial (a relative-error fit, 2.6e-9) and 2^n written
// into the exponent field: clamping x at -127 makes that field 0, so 2^n is +0 and no select
// is needed. The exponentials are 15% of the forward on AVX2 (Sleef's expf costs 1.6x as
// much), bound by the FMA chain's latency as much as by its length.
inline Vec exp2v(Vec x) {
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec xc = at::vec::maximum(x, Vec(-127.f));
  const Vec n = xc.round();
  const Vec f = xc - n;
  // Estrin's scheme: a dependency chain of four instead of Horner's six.
  const Vec f2 = f * f, f4 = f2 * f2;
  const Vec c01 = at::vec::fmadd(Vec(6.931471824645996e-1f), f, Vec(1.f));
  const Vec c23 = at::vec::fmadd(Vec(5.550328642129898e-2f), f, Vec(2.4022647738456726e-1f));
  Vec c46 = at::vec::fmadd(Vec(1.339997397735715e-3f), f, Vec(9.618470445275307e-3f));
  c46 = at::vec::fmadd(Vec(1.5350864850915968e-4f), f2, c46);
  const Vec p = at::vec::fmadd(f4, c46, at::vec::fmadd(f2, c23, c01));
  const IVec biased = at::vec::convert_to_int_of_same_size(n) + IVec(127);  // 0 at n = -127
  return p * at::vec::cast<float>(biased << IVec(23));
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

float hmax(Vec v) {
  float t[kW];
  v.store(t);
  return *std::max_element(t, t + kW);
}

float hsum(Vec v) {
  float t[kW];
  v.store(t);
  float s = 0.f;
  for (int64_t i = 0; i < kW; ++i) s += t[i];
  return s;
}

struct Dims {
  int64_t B, Hq, Hkv, G, Lq, Lk, D, Dp;
  Dims(const at::Tensor& q, const at::Tensor& k)
      : B(q.size(0)), Hq(q.size(1)), Hkv(k.size(1)), G(q.size(1) / k.size(1)), Lq(q.size(2)),
        Lk(k.size(2)), D(q.size(3)), Dp(round_up(q.size(3), kNB)) {}
};

// ---- forward -----------------------------------------------------------------------------

// The forward's query tile. Every query tile reads all of its head's packed keys and values,
// 8 Lk D bytes: while they fit in L2, 96 rows; past it (2 MB at Lk = 4096, D = 64), taller
// tiles re-read them less often (384 rows: 8% faster there, 3% slower at Lk = 512). Halved
// while there would be fewer than two work units per thread. A multiple of kMR.
int64_t forward_query_tile(const Dims& s) {
  int64_t bm = 8 * s.Lk * s.Dp > (1 << 20) ? 384 : 96;
  while (bm > 48 && s.B * s.Hq * ((s.Lq + bm - 1) / bm) < 2 * at::get_num_threads()) bm /= 2;
  return bm;
}

template <typename T>
void forward_kernel(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                    const bool* mask, float scale, at::Tensor& out_, at::Tensor& lse_) {
  const Dims s(q_, k_);
  const Rows<const T> q(q_), k(k_), v(v_);
  const Rows<T> out(out_);
  float* lse = lse_.data_ptr<float>();
  const int64_t bm = forward_query_tile(s);
  const int64_t q_tiles = (s.Lq + bm - 1) / bm, k_tiles = (s.Lk + kBN - 1) / kBN, Dp = s.Dp;

  at::parallel_for(0, s.B * s.Hq * q_tiles, 1, [&](int64_t begin, int64_t end) {
    // Per thread: Q [bm x Dp], S/P [bm x kBN], O [bm x Dp], m and l [bm], and the fp32 keys
    // and values of the KV head in use, packed once per head: K^T tiles [k_tiles][Dp x kBN],
    // V [k_tiles * kBN x Dp], bias [k_tiles * kBN] and the attended-key count of each tile. A
    // thread's units are consecutive, so it re-packs only when it moves to the next head:
    // O(Lk D) memory, O(1) packing per query tile.
    std::vector<float> Qs(bm * Dp), S(bm * kBN), O(bm * Dp), m(bm), l(bm);
    std::vector<float> Kt(k_tiles * Dp * kBN), Vs(k_tiles * kBN * Dp), bias(k_tiles * kBN);
    std::vector<int64_t> valid(k_tiles);
    int64_t packed_b = -1, packed_hk = -1;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (s.Hq * q_tiles), h = unit / q_tiles % s.Hq;
      const int64_t m0 = unit % q_tiles * bm, rows = std::min(bm, s.Lq - m0);
      const int64_t hk = h / s.G;
      if (b != packed_b || hk != packed_hk) {
        for (int64_t t = 0; t < k_tiles; ++t) {
          const int64_t n0 = t * kBN, keys = std::min(kBN, s.Lk - n0);
          valid[t] = key_bias(bias.data() + n0, mask ? mask + b * s.Lk : nullptr, n0, s.Lk);
          pack_cols(Kt.data() + t * Dp * kBN, kBN, k, b, hk, n0, keys, s.D, Dp, 1.f);
          pack_rows(Vs.data() + n0 * Dp, Dp, v, b, hk, n0, keys, kBN, s.D, 1.f);
        }
        packed_b = b, packed_hk = hk;
      }
      pack_rows(Qs.data(), Dp, q, b, h, m0, rows, rows, s.D, scale * kLog2e);  // S in bits
      std::fill(m.begin(), m.end(), -kInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(O.begin(), O.end(), 0.f);

      for (int64_t t = 0; t < k_tiles; ++t) {
        if (valid[t] == 0) continue;  // every key of the tile is padding
        const float* Kt_t = Kt.data() + t * Dp * kBN;
        const float* V_t = Vs.data() + t * kBN * Dp;
        const float* bias_t = bias.data() + t * kBN;
        gemm(rows, kBN, Dp, Qs.data(), Dp, Kt_t, kBN, S.data(), kBN, false);

        for (int64_t r = 0; r < rows; ++r) {
          float* Sr = S.data() + r * kBN;
          Vec vmax(-kInf);
          for (int64_t j = 0; j < kBN; j += kW) {
            Vec x = Vec::loadu(Sr + j);
            if (valid[t] < kBN) x = x + Vec::loadu(bias_t + j);
            x.store(Sr + j);
            vmax = at::vec::maximum(vmax, x);
          }
          const float m_new = std::max(m[r], hmax(vmax));  // finite: the tile has a key
          Vec vsum(0.f);
          const Vec vm(m_new);
          for (int64_t j = 0; j < kBN; j += kW) {
            const Vec p = exp2v(Vec::loadu(Sr + j) - vm);
            p.store(Sr + j);
            vsum = vsum + p;
          }
          if (m_new != m[r]) {  // rescale by 2^(m - m'): 0 on the row's first tile
            const float alpha = std::exp2(m[r] - m_new);
            l[r] *= alpha;
            float* Or = O.data() + r * Dp;
            const Vec va(alpha);
            for (int64_t d = 0; d < Dp; d += kW) (Vec::loadu(Or + d) * va).store(Or + d);
          }
          l[r] += hsum(vsum);
          m[r] = m_new;
        }
        gemm(rows, Dp, kBN, S.data(), kBN, V_t, Dp, O.data(), Dp, true);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        const float* Or = O.data() + r * Dp;
        T* dst = out.row(b, h, m0 + r);
        for (int64_t d = 0; d < s.D; ++d) dst[d] = static_cast<T>(Or[d] * inv);
        const float lse_bits = m[r] + std::log2(l[r]);  // back to nats below
        lse[(b * s.Hq + h) * s.Lq + m0 + r] = l[r] > 0.f ? lse_bits * kLn2 : kInf;
      }
    }
  });
}

// ---- backward ----------------------------------------------------------------------------

// delta[b, h, i] = sum_d dO[b, h, i, d] O[b, h, i, d], in fp32.
template <typename T>
void delta_kernel(const at::Tensor& dout_, const at::Tensor& out_, float* delta) {
  const Rows<const T> dout(dout_), out(out_);
  const int64_t H = out_.size(1), L = out_.size(2), D = out_.size(3);
  at::parallel_for(0, out_.size(0) * H * L, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* a = dout.row(i / (H * L), i / L % H, i % L);
      const T* o = out.row(i / (H * L), i / L % H, i % L);
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += static_cast<float>(a[d]) * static_cast<float>(o[d]);
      delta[i] = acc;
    }
  });
}

// dQ, dK and dV in one pass with five products per (query tile, key tile) pair. A work unit is
// one KV head (b, hk) and a chunk of its key tiles: it owns dK and dV of those keys (summed over
// the G query heads of the group) and walks every query tile of those heads, accumulating the
// tile's dQ over the chunk's keys. With one chunk per head (B * Hkv >= threads) that is the whole
// dQ, written once. With C > 1 chunks each writes a partial dQ into dq_part[c] and a second,
// deterministic pass sums the C partials: no atomics, and the same bits for any thread count of
// one C.
template <typename T>
void backward_kernel(const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_,
                     const at::Tensor& v_, const bool* mask, const float* lse,
                     const float* delta, float scale, at::Tensor& dq_, at::Tensor& dk_,
                     at::Tensor& dv_) {
  const Dims s(q_, k_);
  const Rows<const T> dout(dout_), q(q_), k(k_), v(v_);
  const Rows<T> dq(dq_), dk(dk_), dv(dv_);
  const int64_t k_tiles = (s.Lk + kBN - 1) / kBN, Dp = s.Dp;
  const int64_t heads = s.B * s.Hkv;
  if (heads == 0 || k_tiles == 0) {  // no key: dq = 0, and dk, dv are empty
    dq_.zero_();
    return;
  }
  // Key chunks per KV head: enough units for every thread when there are few heads.
  const int64_t want = std::min(k_tiles, (at::get_num_threads() + heads - 1) / heads);
  const int64_t chunk_tiles = (k_tiles + want - 1) / want;
  const int64_t C = (k_tiles + chunk_tiles - 1) / chunk_tiles, chunk_keys = chunk_tiles * kBN;
  // Partial dQs, dq_part[c, (b * Hq + h) * Lq + i, :] in fp32, only when C > 1.
  at::Tensor dq_part;
  if (C > 1) dq_part = at::empty({C, s.B * s.Hq * s.Lq, Dp}, q_.options().dtype(at::kFloat));
  float* part = C > 1 ? dq_part.data_ptr<float>() : nullptr;

  at::parallel_for(0, heads * C, 1, [&](int64_t begin, int64_t end) {
    // The chunk's K, V rows and its dK, dV [chunk_keys x Dp] with per-key bias; one query
    // tile's sQ, dO rows [kBM x Dp] and transposes [Dp x kBM], dQ [kBM x Dp]; P^T, dP^T
    // [kBN x kBM] for one key tile.
    std::vector<float> Ks(chunk_keys * Dp), Vs(chunk_keys * Dp), dK(chunk_keys * Dp),
        dV(chunk_keys * Dp), bias(chunk_keys);
    std::vector<float> Qs(kBM * Dp), dOs(kBM * Dp), Qt(Dp * kBM), dOt(Dp * kBM), dQ(kBM * Dp);
    std::vector<float> Pt(kBN * kBM), dPt(kBN * kBM);
    std::vector<int64_t> valid(chunk_tiles);
    float lse_t[kBM], delta_t[kBM];
    const Vec log2e(kLog2e);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (s.Hkv * C), hk = unit / C % s.Hkv, c = unit % C;
      const int64_t k0 = c * chunk_keys, k1 = std::min(s.Lk, k0 + chunk_keys);
      const int64_t tiles = (k1 - k0 + kBN - 1) / kBN;
      const bool* mask_row = mask ? mask + b * s.Lk : nullptr;
      int64_t live = 0;  // key tiles with an attended key
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = k0 + t * kBN, keys = std::min(kBN, k1 - n0);
        valid[t] = key_bias(bias.data() + t * kBN, mask_row, n0, s.Lk);
        live += valid[t] > 0;
        pack_rows(Ks.data() + t * kBN * Dp, Dp, k, b, hk, n0, keys, kBN, s.D, 1.f);
        pack_rows(Vs.data() + t * kBN * Dp, Dp, v, b, hk, n0, keys, kBN, s.D, 1.f);
      }
      std::fill(dK.begin(), dK.end(), 0.f);
      std::fill(dV.begin(), dV.end(), 0.f);

      for (int64_t h = hk * s.G; h < (hk + 1) * s.G; ++h) {
        for (int64_t m0 = 0; m0 < s.Lq; m0 += kBM) {
          const int64_t rows = std::min(kBM, s.Lq - m0);
          const int64_t row0 = (b * s.Hq + h) * s.Lq + m0;
          std::fill(dQ.begin(), dQ.end(), 0.f);
          if (live > 0) {
            pack_rows(Qs.data(), Dp, q, b, h, m0, rows, kBM, s.D, scale);
            pack_cols(Qt.data(), kBM, q, b, h, m0, rows, s.D, Dp, scale);
            pack_rows(dOs.data(), Dp, dout, b, h, m0, rows, kBM, s.D, 1.f);
            pack_cols(dOt.data(), kBM, dout, b, h, m0, rows, s.D, Dp, 1.f);
            for (int64_t i = 0; i < kBM; ++i) {  // padded query rows get P = 0
              lse_t[i] = i < rows ? lse[row0 + i] * kLog2e : kInf;  // in bits
              delta_t[i] = i < rows ? delta[row0 + i] : 0.f;
            }
          }
          for (int64_t t = 0; t < tiles; ++t) {
            if (valid[t] == 0) continue;  // every key of the tile is padding
            const float* K_t = Ks.data() + t * kBN * Dp;
            const float* V_t = Vs.data() + t * kBN * Dp;
            const float* bias_t = bias.data() + t * kBN;
            gemm(kBN, kBM, Dp, K_t, Dp, Qt.data(), kBM, Pt.data(), kBM, false);    // S^T
            gemm(kBN, kBM, Dp, V_t, Dp, dOt.data(), kBM, dPt.data(), kBM, false);  // dP^T
            for (int64_t j = 0; j < kBN; ++j) {
              float* P = Pt.data() + j * kBM;
              float* dP = dPt.data() + j * kBM;
              if (bias_t[j] != 0.f) {  // padded key: no probability, no gradient
                std::fill(P, P + kBM, 0.f);
                std::fill(dP, dP + kBM, 0.f);
                continue;
              }
              for (int64_t i = 0; i < kBM; i += kW) {
                const Vec x = at::vec::fmsub(Vec::loadu(P + i), log2e, Vec::loadu(lse_t + i));
                const Vec p = exp2v(x);  // e^(S - lse)
                p.store(P + i);
                (p * (Vec::loadu(dP + i) - Vec::loadu(delta_t + i))).store(dP + i);  // dS^T
              }
            }
            float* dV_t = dV.data() + t * kBN * Dp;
            float* dK_t = dK.data() + t * kBN * Dp;
            gemm(kBN, Dp, kBM, Pt.data(), kBM, dOs.data(), Dp, dV_t, Dp, true);   // += P^T dO
            gemm(kBN, Dp, kBM, dPt.data(), kBM, Qs.data(), Dp, dK_t, Dp, true);   // += dS^T sQ
            gemm<true>(rows, Dp, kBN, dPt.data(), kBM, K_t, Dp, dQ.data(), Dp, true);  // += dS K
          }
          for (int64_t r = 0; r < rows; ++r) {
            const float* src = dQ.data() + r * Dp;
            if (C == 1) {
              T* dst = dq.row(b, h, m0 + r);
              for (int64_t d = 0; d < s.D; ++d) dst[d] = static_cast<T>(scale * src[d]);
            } else {
              std::copy(src, src + Dp, part + ((c * s.B * s.Hq * s.Lq) + row0 + r) * Dp);
            }
          }
        }
      }
      for (int64_t j = 0; j < k1 - k0; ++j) {
        T* dk_row = dk.row(b, hk, k0 + j);
        T* dv_row = dv.row(b, hk, k0 + j);
        for (int64_t d = 0; d < s.D; ++d) {
          dk_row[d] = static_cast<T>(dK[j * Dp + d]);
          dv_row[d] = static_cast<T>(dV[j * Dp + d]);
        }
      }
    }
  });
  if (C == 1) return;
  // dq = scale * sum_c dq_part[c], summed in chunk order.
  const int64_t rows = s.B * s.Hq * s.Lq, stride = rows * Dp;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* dst = dq.row(i / (s.Hq * s.Lq), i / s.Lq % s.Hq, i % s.Lq);
      for (int64_t d = 0; d < s.D; ++d) {
        float acc = 0.f;
        for (int64_t c = 0; c < C; ++c) acc += part[c * stride + i * Dp + d];
        dst[d] = static_cast<T>(scale * acc);
      }
    }
  });
}

// ---- entry points ------------------------------------------------------------------------

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4 && t->stride(3) == 1,
                "bidirectional_attention (cpu): q, k, v must be 4-d CPU tensors with unit "
                "stride along D (the public op guarantees this)");
  }
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "bidirectional_attention (cpu): Hq must be a multiple of Hkv");
  TORCH_CHECK(!mask || (mask->scalar_type() == at::kBool && mask->is_contiguous()),
              "bidirectional_attention (cpu): key_padding_mask must be contiguous bool");
}

#define LLADA_DISPATCH_ATTENTION_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                         \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                    \
                             AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

std::tuple<at::Tensor, at::Tensor> bidirectional_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  check_inputs(q, k, v, key_padding_mask);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const bool* mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  LLADA_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "bidirectional_attention_fwd_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, mask, static_cast<float>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bidirectional_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  check_inputs(q, k, v, key_padding_mask);
  TORCH_CHECK(grad_out.stride(3) == 1 && out.stride(3) == 1 && lse.is_contiguous() &&
                  lse.scalar_type() == at::kFloat,
              "bidirectional_attention (cpu): grad_out and out need unit stride along D, lse "
              "must be contiguous fp32");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  const bool* mask = key_padding_mask ? key_padding_mask->data_ptr<bool>() : nullptr;
  const float s = static_cast<float>(scale);
  LLADA_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "bidirectional_attention_bwd_cpu", [&] {
    delta_kernel<scalar_t>(grad_out, out, delta.data_ptr<float>());
    backward_kernel<scalar_t>(grad_out, q, k, v, mask, lse.data_ptr<float>(),
                              delta.data_ptr<float>(), s, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("bidirectional_attention_fwd", &bidirectional_attention_fwd_cpu);
  m.impl("bidirectional_attention_bwd", &bidirectional_attention_bwd_cpu);
}

}  // namespace llada
