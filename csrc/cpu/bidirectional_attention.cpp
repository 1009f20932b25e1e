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
// Backward, with delta_i = sum_d dO_id O_id:
//   dP = dO V^T,  dS = P * (dP - delta),  dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K
// in two passes that own their outputs (no atomics, deterministic): key tiles accumulate dK and
// dV over every query tile of every query head of their group, then query tiles accumulate dQ.
//
// Extra memory is O(Lk D) per thread (the forward packs one KV head at a time) plus delta
// [B, Hq, Lq]: never Lq x Lk. Every tile is converted to fp32 as it is packed; the products
// run in one register-blocked fp32 kernel on at::vec::Vectorized (FMA). Tiles are zero-padded
// to whole register blocks, so the inner loops have no tails. Key tiles whose keys are all
// padded are skipped.

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
constexpr int kMR = 4;                   // register block: kMR rows x kNV vectors
constexpr int kNV = 2;
constexpr int64_t kNB = kNV * kW;        // register block width (columns)
constexpr int64_t kBM = 64;              // query tile (a multiple of kMR)
constexpr int64_t kBN = 64;              // key tile (a multiple of kNB)
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[kMR x kNB] (+)= A[kMR x K] B[K x kNB], all row-major fp32.
inline void micro_kernel(const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                         int64_t ldc, int64_t K, bool accumulate) {
  Vec acc[kMR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kNV; ++c)
      acc[r][c] = accumulate ? Vec::loadu(C + r * ldc + c * kW) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec b[kNV];
#pragma GCC unroll 4
    for (int c = 0; c < kNV; ++c) b[c] = Vec::loadu(B + k * ldb + c * kW);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const Vec a(A[r * lda + k]);
#pragma GCC unroll 4
      for (int c = 0; c < kNV; ++c) acc[r][c] = at::vec::fmadd(a, b[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < kNV; ++c) acc[r][c].store(C + r * ldc + c * kW);
}

// C[M x N] (+)= A[M x K] B[K x N]; M a multiple of kMR, N of kNB (the tiles are padded).
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; i += kMR)
    for (int64_t j = 0; j < N; j += kNB)
      micro_kernel(A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, K, accumulate);
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

template <typename T>
void forward_kernel(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                    const bool* mask, float scale, at::Tensor& out_, at::Tensor& lse_) {
  const Dims s(q_, k_);
  const Rows<const T> q(q_), k(k_), v(v_);
  const Rows<T> out(out_);
  float* lse = lse_.data_ptr<float>();
  const int64_t q_tiles = (s.Lq + kBM - 1) / kBM, k_tiles = (s.Lk + kBN - 1) / kBN, Dp = s.Dp;

  at::parallel_for(0, s.B * s.Hq * q_tiles, 1, [&](int64_t begin, int64_t end) {
    // Per thread: Q [kBM x Dp], S/P [kBM x kBN], O [kBM x Dp], and the fp32 keys and values of
    // the KV head in use, packed once per head: K^T tiles [k_tiles][Dp x kBN], V [k_tiles * kBN
    // x Dp], bias [k_tiles * kBN] and the attended-key count of each tile. A thread's units are
    // consecutive, so it re-packs only when it moves to the next head: O(Lk D) memory, O(1)
    // packing per query tile.
    std::vector<float> Qs(kBM * Dp), S(kBM * kBN), O(kBM * Dp);
    std::vector<float> Kt(k_tiles * Dp * kBN), Vs(k_tiles * kBN * Dp), bias(k_tiles * kBN);
    std::vector<int64_t> valid(k_tiles);
    int64_t packed_b = -1, packed_hk = -1;
    float m[kBM], l[kBM];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (s.Hq * q_tiles), h = unit / q_tiles % s.Hq;
      const int64_t m0 = unit % q_tiles * kBM, rows = std::min(kBM, s.Lq - m0);
      const int64_t rows_pad = round_up(rows, kMR), hk = h / s.G;
      if (b != packed_b || hk != packed_hk) {
        for (int64_t t = 0; t < k_tiles; ++t) {
          const int64_t n0 = t * kBN, keys = std::min(kBN, s.Lk - n0);
          valid[t] = key_bias(bias.data() + n0, mask ? mask + b * s.Lk : nullptr, n0, s.Lk);
          pack_cols(Kt.data() + t * Dp * kBN, kBN, k, b, hk, n0, keys, s.D, Dp, 1.f);
          pack_rows(Vs.data() + n0 * Dp, Dp, v, b, hk, n0, keys, kBN, s.D, 1.f);
        }
        packed_b = b, packed_hk = hk;
      }
      pack_rows(Qs.data(), Dp, q, b, h, m0, rows, rows_pad, s.D, scale);
      std::fill(m, m + kBM, -kInf);
      std::fill(l, l + kBM, 0.f);
      std::fill(O.begin(), O.end(), 0.f);

      for (int64_t t = 0; t < k_tiles; ++t) {
        if (valid[t] == 0) continue;  // every key of the tile is padding
        const float* Kt_t = Kt.data() + t * Dp * kBN;
        const float* V_t = Vs.data() + t * kBN * Dp;
        const float* bias_t = bias.data() + t * kBN;
        gemm(rows_pad, kBN, Dp, Qs.data(), Dp, Kt_t, kBN, S.data(), kBN, false);

        for (int64_t r = 0; r < rows_pad; ++r) {
          float* Sr = S.data() + r * kBN;
          Vec vmax(-kInf);
          for (int64_t j = 0; j < kBN; j += kW) {
            Vec x = Vec::loadu(Sr + j);
            if (valid[t] < kBN) x = x + Vec::loadu(bias_t + j);
            x.store(Sr + j);
            vmax = at::vec::maximum(vmax, x);
          }
          const float m_new = std::max(m[r], hmax(vmax));  // finite: the tile has a key
          const float alpha = std::exp(m[r] - m_new);       // 0 on the first tile
          Vec vsum(0.f);
          const Vec vm(m_new);
          for (int64_t j = 0; j < kBN; j += kW) {
            const Vec p = (Vec::loadu(Sr + j) - vm).exp();
            p.store(Sr + j);
            vsum = vsum + p;
          }
          l[r] = l[r] * alpha + hsum(vsum);
          m[r] = m_new;
          float* Or = O.data() + r * Dp;
          const Vec va(alpha);
          for (int64_t d = 0; d < Dp; d += kW) (Vec::loadu(Or + d) * va).store(Or + d);
        }
        gemm(rows_pad, Dp, kBN, S.data(), kBN, V_t, Dp, O.data(), Dp, true);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        const float* Or = O.data() + r * Dp;
        T* dst = out.row(b, h, m0 + r);
        for (int64_t d = 0; d < s.D; ++d) dst[d] = static_cast<T>(Or[d] * inv);
        lse[(b * s.Hq + h) * s.Lq + m0 + r] = l[r] > 0.f ? m[r] + std::log(l[r]) : kInf;
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

// dK, dV for one key tile, summed over the G query heads of its group and every query tile.
template <typename T>
void dkdv_kernel(const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_,
                 const at::Tensor& v_, const bool* mask, const float* lse, const float* delta,
                 float scale, at::Tensor& dk_, at::Tensor& dv_) {
  const Dims s(q_, k_);
  const Rows<const T> dout(dout_), q(q_), k(k_), v(v_);
  const Rows<T> dk(dk_), dv(dv_);
  const int64_t k_tiles = (s.Lk + kBN - 1) / kBN, Dp = s.Dp;

  at::parallel_for(0, s.B * s.Hkv * k_tiles, 1, [&](int64_t begin, int64_t end) {
    // K, V, dK, dV [kBN x Dp]; Q, dO [kBM x Dp]; Q^T, dO^T [Dp x kBM]; P^T, dP^T [kBN x kBM].
    std::vector<float> Ks(kBN * Dp), Vs(kBN * Dp), dK(kBN * Dp), dV(kBN * Dp);
    std::vector<float> Qs(kBM * Dp), dOs(kBM * Dp), Qt(Dp * kBM), dOt(Dp * kBM);
    std::vector<float> Pt(kBN * kBM), dPt(kBN * kBM);
    float bias[kBN], lse_t[kBM], delta_t[kBM];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (s.Hkv * k_tiles), hk = unit / k_tiles % s.Hkv;
      const int64_t n0 = unit % k_tiles * kBN, keys = std::min(kBN, s.Lk - n0);
      const int64_t valid = key_bias(bias, mask ? mask + b * s.Lk : nullptr, n0, s.Lk);
      std::fill(dK.begin(), dK.end(), 0.f);
      std::fill(dV.begin(), dV.end(), 0.f);
      if (valid > 0) {
        pack_rows(Ks.data(), Dp, k, b, hk, n0, keys, kBN, s.D, 1.f);
        pack_rows(Vs.data(), Dp, v, b, hk, n0, keys, kBN, s.D, 1.f);
        for (int64_t h = hk * s.G; h < (hk + 1) * s.G; ++h) {
          for (int64_t m0 = 0; m0 < s.Lq; m0 += kBM) {
            const int64_t rows = std::min(kBM, s.Lq - m0);
            pack_rows(Qs.data(), Dp, q, b, h, m0, rows, kBM, s.D, scale);
            pack_cols(Qt.data(), kBM, q, b, h, m0, rows, s.D, Dp, scale);
            pack_rows(dOs.data(), Dp, dout, b, h, m0, rows, kBM, s.D, 1.f);
            pack_cols(dOt.data(), kBM, dout, b, h, m0, rows, s.D, Dp, 1.f);
            const int64_t row0 = (b * s.Hq + h) * s.Lq + m0;
            for (int64_t i = 0; i < kBM; ++i) {  // padded query rows get P = 0
              lse_t[i] = i < rows ? lse[row0 + i] : kInf;
              delta_t[i] = i < rows ? delta[row0 + i] : 0.f;
            }
            gemm(kBN, kBM, Dp, Ks.data(), Dp, Qt.data(), kBM, Pt.data(), kBM, false);   // S^T
            gemm(kBN, kBM, Dp, Vs.data(), Dp, dOt.data(), kBM, dPt.data(), kBM, false); // dP^T
            for (int64_t j = 0; j < kBN; ++j) {
              float* P = Pt.data() + j * kBM;
              float* dP = dPt.data() + j * kBM;
              if (bias[j] != 0.f) {  // padded key: no probability, no gradient
                std::fill(P, P + kBM, 0.f);
                std::fill(dP, dP + kBM, 0.f);
                continue;
              }
              for (int64_t i = 0; i < kBM; i += kW) {
                const Vec p = (Vec::loadu(P + i) - Vec::loadu(lse_t + i)).exp();
                p.store(P + i);
                (p * (Vec::loadu(dP + i) - Vec::loadu(delta_t + i))).store(dP + i);  // dS^T
              }
            }
            gemm(kBN, Dp, kBM, Pt.data(), kBM, dOs.data(), Dp, dV.data(), Dp, true);  // P^T dO
            gemm(kBN, Dp, kBM, dPt.data(), kBM, Qs.data(), Dp, dK.data(), Dp, true);  // dS^T (sQ)
          }
        }
      }
      for (int64_t j = 0; j < keys; ++j) {
        T* dk_row = dk.row(b, hk, n0 + j);
        T* dv_row = dv.row(b, hk, n0 + j);
        for (int64_t d = 0; d < s.D; ++d) {
          dk_row[d] = static_cast<T>(dK[j * Dp + d]);
          dv_row[d] = static_cast<T>(dV[j * Dp + d]);
        }
      }
    }
  });
}

// dQ for one query tile: scale * sum over key tiles of dS K.
template <typename T>
void dq_kernel(const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_,
               const at::Tensor& v_, const bool* mask, const float* lse, const float* delta,
               float scale, at::Tensor& dq_) {
  const Dims s(q_, k_);
  const Rows<const T> dout(dout_), q(q_), k(k_), v(v_);
  const Rows<T> dq(dq_);
  const int64_t q_tiles = (s.Lq + kBM - 1) / kBM, Dp = s.Dp;

  at::parallel_for(0, s.B * s.Hq * q_tiles, 1, [&](int64_t begin, int64_t end) {
    // Q, dO, dQ [kBM x Dp]; K [kBN x Dp]; K^T, V^T [Dp x kBN]; P, dP [kBM x kBN].
    std::vector<float> Qs(kBM * Dp), dOs(kBM * Dp), dQ(kBM * Dp), Ks(kBN * Dp);
    std::vector<float> Kt(Dp * kBN), Vt(Dp * kBN), P(kBM * kBN), dP(kBM * kBN);
    float bias[kBN];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / (s.Hq * q_tiles), h = unit / q_tiles % s.Hq;
      const int64_t m0 = unit % q_tiles * kBM, rows = std::min(kBM, s.Lq - m0);
      const int64_t rows_pad = round_up(rows, kMR), hk = h / s.G;
      const int64_t row0 = (b * s.Hq + h) * s.Lq + m0;
      const bool* mask_row = mask ? mask + b * s.Lk : nullptr;
      pack_rows(Qs.data(), Dp, q, b, h, m0, rows, rows_pad, s.D, scale);
      pack_rows(dOs.data(), Dp, dout, b, h, m0, rows, rows_pad, s.D, 1.f);
      std::fill(dQ.begin(), dQ.end(), 0.f);

      for (int64_t n0 = 0; n0 < s.Lk; n0 += kBN) {
        const int64_t valid = key_bias(bias, mask_row, n0, s.Lk);
        if (valid == 0) continue;
        const int64_t keys = std::min(kBN, s.Lk - n0);
        pack_cols(Kt.data(), kBN, k, b, hk, n0, keys, s.D, Dp, 1.f);
        pack_cols(Vt.data(), kBN, v, b, hk, n0, keys, s.D, Dp, 1.f);
        pack_rows(Ks.data(), Dp, k, b, hk, n0, keys, kBN, s.D, 1.f);
        gemm(rows_pad, kBN, Dp, Qs.data(), Dp, Kt.data(), kBN, P.data(), kBN, false);    // S
        gemm(rows_pad, kBN, Dp, dOs.data(), Dp, Vt.data(), kBN, dP.data(), kBN, false);  // dP
        for (int64_t r = 0; r < rows_pad; ++r) {
          float* Pr = P.data() + r * kBN;
          float* dPr = dP.data() + r * kBN;
          const Vec l(r < rows ? lse[row0 + r] : kInf), dl(r < rows ? delta[row0 + r] : 0.f);
          for (int64_t j = 0; j < kBN; j += kW) {
            const Vec p = (Vec::loadu(Pr + j) + Vec::loadu(bias + j) - l).exp();
            (p * (Vec::loadu(dPr + j) - dl)).store(dPr + j);  // dS
          }
        }
        gemm(rows_pad, Dp, kBN, dP.data(), kBN, Ks.data(), Dp, dQ.data(), Dp, true);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = dq.row(b, h, m0 + r);
        for (int64_t d = 0; d < s.D; ++d) dst[d] = static_cast<T>(scale * dQ[r * Dp + d]);
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
    dkdv_kernel<scalar_t>(grad_out, q, k, v, mask, lse.data_ptr<float>(),
                          delta.data_ptr<float>(), s, dk, dv);
    dq_kernel<scalar_t>(grad_out, q, k, v, mask, lse.data_ptr<float>(), delta.data_ptr<float>(),
                        s, dq);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("bidirectional_attention_fwd", &bidirectional_attention_fwd_cpu);
  m.impl("bidirectional_attention_bwd", &bidirectional_attention_bwd_cpu);
}

}  // namespace llada
