// The forward of llada::attention_fwd on the CPU (schema: csrc/ops.cpp; what it shares with the
// backward, and the notation: attention.h).
//
// FlashAttention-2 order: a query tile of kBM rows walks the key tiles of kBN keys that the
// mask does not skip, keeping per row the running max m, the running sum l and an
// unnormalised accumulator O:
//   m' = max(m, rowmax S),  l' = l e^(m - m') + rowsum e^(S - m'),  O' = O e^(m - m') + e^(S - m') V
// and ends with O / l and lse = m + log l. A row that has seen no key yet (m = -inf) adds
// nothing; a row that never sees one gets O = 0, lse = +inf.
//
// Keys and values are packed into B operands (K^T [Kd x kBN] and V [kBN x D] per key tile, fp32
// or bf16 VNNI) by each thread, for the KV head of the query tile at hand, and only the key tiles
// the mask leaves to it; a thread's next query tiles (the same head, or another query head of
// its group) reuse them. So one call is one parallel region. Extra memory per thread: one KV
// head's packed tiles and one query tile's Q, S, P and O: O(L D), never Lq x Lk.

#include <torch/library.h>

#include "cpu/attention.h"

namespace llada::attn {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBM = 64;  // query tile

// One thread's scratch: one KV head's packed key tiles, and one query tile.
template <typename C>
struct Scratch {
  std::vector<C> kv;            // per key tile: K^T [Kd x kBN] then V [kBN x D] (B operands)
  std::vector<int64_t> kv_head; // per key tile: the (b, hk) it holds, -1 for none
  std::vector<C> q;             // [kBM x Kd] A operand
  std::vector<float> s;         // [kBM x kBN] scores
  std::vector<C> p;             // [kBM x kBN] probabilities, the A operand of P V (C = bf16)
  std::vector<float> o;         // [kBM x Dp] accumulator
  std::vector<float> m, l;      // [kBM]
  Scratch(int64_t k_tiles, int64_t tile_elems, int64_t Kd, int64_t Dp)
      : kv(k_tiles * tile_elems), kv_head(k_tiles, -1), q(kBM * Kd), s(kBM * kBN),
        p(std::is_same_v<C, float> ? 0 : kBM * kBN), o(kBM * Dp), m(kBM), l(kBM) {}
};

// The online-softmax update of R rows of a score tile (their scores S [R x kBN] from Q K^T):
// scale (when Q did not carry it), mask (a partial tile), row max, e^(s - m') written over S
// (and as C into P), and the running max m, sum l and accumulator O rescaled. The R rows are
// interleaved: each row's chain (max, reduce, exponentials, reduce) is a long dependency chain,
// and R of them overlap.
template <typename C, int R>
inline void softmax_rows(float* S, C* P, float* O, int64_t Dp, float* m, float* l, float scale,
                         bool partial, const int32_t* qdoc, const int32_t* level,
                         const int32_t* kdoc, const int32_t* lo, const int32_t* hi) {
  Vec vmax[R];
  for (int r = 0; r < R; ++r) vmax[r] = Vec(-kInf);
  if (partial || !kScaleInQ<C>) {
    IVec vd[R], vl[R];
    for (int r = 0; r < R; ++r) vd[r] = IVec(qdoc[r]), vl[r] = IVec(level[r]);
    for (int64_t j = 0; j < kBN; j += kW) {
      IVec kd, klo, khi;
      if (partial) kd = IVec::loadu(kdoc + j), klo = IVec::loadu(lo + j), khi = IVec::loadu(hi + j);
      for (int r = 0; r < R; ++r) {
        Vec x = Vec::loadu(S + r * kBN + j);
        if constexpr (!kScaleInQ<C>) x = opaque(x * Vec(scale));
        if (partial) {
          const IVec hidden = (kd != vd[r]) | (klo > vl[r]) | (khi < vl[r]);
          x = Vec::blendv(x, Vec(-kInf), at::vec::cast<float>(hidden));
        }
        x.store(S + r * kBN + j);
        vmax[r] = at::vec::maximum(vmax[r], x);
      }
    }
  } else {
    for (int64_t j = 0; j < kBN; j += kW)
      for (int r = 0; r < R; ++r) vmax[r] = at::vec::maximum(vmax[r], Vec::loadu(S + r * kBN + j));
  }
  float m_new[R];
  Vec vm[R], vsum[R];
  for (int r = 0; r < R; ++r) {
    m_new[r] = std::max(m[r], hmax(vmax[r]));
    // A row that has seen no key yet: subtracting +inf makes every e^(s - m') exactly 0.
    vm[r] = Vec(m_new[r] == -kInf ? kInf : m_new[r]);
    vsum[r] = Vec(0.f);
  }
  const Vec vlog2e(kLog2e);
  for (int64_t j = 0; j < kBN; j += kW) {
    for (int r = 0; r < R; ++r) {
      const Vec p = exp2v((Vec::loadu(S + r * kBN + j) - vm[r]) * vlog2e);  // e^(s - m')
      p.store(S + r * kBN + j);
      vsum[r] = vsum[r] + p;
    }
  }
  for (int r = 0; r < R; ++r) {
    store_row(P + r * kBN, S + r * kBN, kBN);
    if (m_new[r] != m[r] && m[r] != -kInf) {  // rescale by e^(m - m')
      const float alpha = std::exp(m[r] - m_new[r]);
      l[r] *= alpha;
      const Vec va(alpha);
      float* Or = O + r * Dp;
      for (int64_t d = 0; d < Dp; d += kW) (Vec::loadu(Or + d) * va).store(Or + d);
    }
    l[r] += hsum(vsum[r]);
    m[r] = m_new[r];
  }
}

template <typename T, typename C>
void forward(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const Mask& mask,
             float scale, at::Tensor& out_, at::Tensor& lse_) {
  const Dims s(q_, k_);
  const Rows<const T> q(q_), k(k_), v(v_);
  const Rows<T> out(out_);
  float* lse = lse_.data_ptr<float>();
  const int64_t Kd = round_up(s.D, kPair<C>), Dp = round_up(s.D, kW), D = s.D;
  const int64_t q_tiles = ceil_div(s.Lq, kBM);
  const KeyTiles keys = key_tiles(mask, s.B);
  const std::vector<QStats> qstats = query_stats(mask, s.B, kBM);
  const int64_t k_tiles = keys.tiles;

  const int64_t tile_elems = Kd * kBN + kBN * D;

  for_each_unit(
      s.B * s.Hq * q_tiles, [&] { return Scratch<C>(k_tiles, tile_elems, Kd, Dp); },
      [&](Scratch<C>& w, int64_t unit) {
        const int64_t b = unit / (s.Hq * q_tiles), h = unit / q_tiles % s.Hq;
        const int64_t tq = unit % q_tiles, m0 = tq * kBM, rows = std::min(kBM, s.Lq - m0);
        const int64_t hk = h / s.G;
        const QStats& qs = qstats[b * q_tiles + tq];
        const int32_t* qdoc = mask.qdoc(b) + m0;
        const int32_t* level = mask.level(b) + m0;
        pack_a<C>(w.q.data(), Kd, q, b, h, m0, rows, rows, D, kScaleInQ<C> ? scale : 1.f);
        std::fill(w.m.begin(), w.m.end(), -kInf);
        std::fill(w.l.begin(), w.l.end(), 0.f);
        std::fill(w.o.begin(), w.o.begin() + rows * Dp, 0.f);
        C* P = std::is_same_v<C, float> ? reinterpret_cast<C*>(w.s.data()) : w.p.data();

        for (int64_t t = 0; t < k_tiles; ++t) {
          const Kind kind = classify(qs, keys.stats[b * k_tiles + t]);
          if (kind == Kind::kSkip) continue;
          C* kt = w.kv.data() + t * tile_elems;
          if (w.kv_head[t] != b * s.Hkv + hk) {  // this thread has not packed this tile yet
            const int64_t n0 = t * kBN, n = std::min(kBN, s.Lk - n0);
            pack_b_cols<C>(kt, kBN, k, b, hk, n0, n, D, Kd);
            pack_b_rows<C>(kt + Kd * kBN, v, b, hk, n0, n, kBN, D);
            w.kv_head[t] = b * s.Hkv + hk;
          }
          gemm(rows, kBN, Kd, w.q.data(), Kd, kt, kBN, w.s.data(), kBN, false);  // Q K^T
          const bool partial = kind == Kind::kPartial;
          const int32_t* kdoc = keys.tile_doc(b, t);
          const int32_t* lo = keys.tile_lo(b, t);
          const int32_t* hi = keys.tile_hi(b, t);
          int64_t r = 0;
          for (; r + 4 <= rows; r += 4)
            softmax_rows<C, 4>(w.s.data() + r * kBN, P + r * kBN, w.o.data() + r * Dp, Dp,
                               w.m.data() + r, w.l.data() + r, scale, partial, qdoc + r,
                               level + r, kdoc, lo, hi);
          for (; r < rows; ++r)
            softmax_rows<C, 1>(w.s.data() + r * kBN, P + r * kBN, w.o.data() + r * Dp, Dp,
                               w.m.data() + r, w.l.data() + r, scale, partial, qdoc + r,
                               level + r, kdoc, lo, hi);
          gemm(rows, D, kBN, P, kBN, kt + Kd * kBN, D, w.o.data(), Dp, true);  // O += P V
        }

        for (int64_t r = 0; r < rows; ++r) {
          const float l = w.l[r];
          const float inv = l > 0.f ? 1.f / l : 0.f;
          const float* Or = w.o.data() + r * Dp;
          T* dst = out.row(b, h, m0 + r);
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(Or[d] * inv);
          lse[(b * s.Hq + h) * s.Lq + m0 + r] = l > 0.f ? w.m[r] + std::log(l) : kInf;
        }
      },
      release_products<C>);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& q_mask,
                                                     const std::optional<at::Tensor>& k_mask,
                                                     double scale) {
  check_inputs("attention_fwd", q, k, v, q_mask, k_mask);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const MaskTensors masks = masks_or_all(q_mask, k_mask, q.size(0), q.size(2), k.size(2));
  const Mask m = masks.view();
  const float sc = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: forward<float, float>(q, k, v, m, sc, out, lse); break;
    case at::kHalf: forward<at::Half, float>(q, k, v, m, sc, out, lse); break;
    case at::kBFloat16:
      if (bf16_products()) {
        forward<at::BFloat16, at::BFloat16>(q, k, v, m, sc, out, lse);
      } else {
        forward<at::BFloat16, float>(q, k, v, m, sc, out, lse);
      }
      break;
    default:
      TORCH_CHECK(false, "attention_fwd (cpu): q must be float32, bfloat16 or float16; got ",
                  q.scalar_type());
  }
  return {out, lse};
}

}  // namespace
}  // namespace CPU_CAPABILITY

LLADA_ISA_KERNEL(attention_fwd_stub, CPU_CAPABILITY::attention_fwd_cpu);

#ifdef CPU_CAPABILITY_DEFAULT  // registered once; each call runs the copy in use
TORCH_LIBRARY_IMPL(llada, CPU, m) { m.impl("attention_fwd", LLADA_ISA_DISPATCH(attention_fwd_stub)); }
#endif

}  // namespace llada::attn
