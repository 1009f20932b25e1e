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
// Before the query tiles, each KV head's keys and values are packed once into B operands
// (K^T [Kd x kBN] and V [kBN x D] per key tile, fp32 or bf16 VNNI), shared by every query head
// of the group and every thread. Extra memory: that copy of K and V, and per thread one query
// tile's Q, S, P and O: O(L D), never Lq x Lk.

#include <torch/library.h>

#include "cpu/attention.h"

namespace llada::attn {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBM = 64;  // query tile

// One query tile's scratch, per thread.
template <typename C>
struct Scratch {
  std::vector<C> q;        // [kBM x Kd] A operand
  std::vector<float> s;    // [kBM x kBN] scores
  std::vector<C> p;        // [kBM x kBN] probabilities, as the A operand of P V (C = bf16)
  std::vector<float> o;    // [kBM x Dp] accumulator
  std::vector<float> m, l; // [kBM]
  Scratch(int64_t Kd, int64_t Dp)
      : q(kBM * Kd), s(kBM * kBN), p(std::is_same_v<C, float> ? 0 : kBM * kBN), o(kBM * Dp),
        m(kBM), l(kBM) {}
};

// Row r of the score tile: scaled (when Q did not carry the scale), masked (when the tile is
// partial), and its max.
template <typename C>
inline float mask_and_max(float* s, float scale, bool partial, int32_t qdoc, int32_t level,
                          const int32_t* kdoc, const int32_t* lo, const int32_t* hi) {
  Vec vmax(-kInf);
  if (!partial && kScaleInQ<C>) {
    for (int64_t j = 0; j < kBN; j += kW) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
    return hmax(vmax);
  }
  const IVec vd(qdoc), vl(level);
  for (int64_t j = 0; j < kBN; j += kW) {
    Vec x = Vec::loadu(s + j);
    if constexpr (!kScaleInQ<C>) x = opaque(x * Vec(scale));
    if (partial) {
      const IVec hidden = (IVec::loadu(kdoc + j) != vd) | (IVec::loadu(lo + j) > vl) |
                          (IVec::loadu(hi + j) < vl);
      x = Vec::blendv(x, Vec(-kInf), at::vec::cast<float>(hidden));
    }
    x.store(s + j);
    vmax = at::vec::maximum(vmax, x);
  }
  return hmax(vmax);
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

  // Packed keys and values: per (b, hk, key tile) K^T [Kd x kBN] then V [kBN x D].
  const int64_t tile_elems = Kd * kBN + kBN * D;
  const at::Tensor packed_ = at::empty({s.B * s.Hkv * k_tiles * tile_elems},
                                       q_.options().dtype(c10::CppTypeToScalarType<C>::value));
  C* packed = static_cast<C*>(packed_.data_ptr());
  at::parallel_for(0, s.B * s.Hkv * k_tiles, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (s.Hkv * k_tiles), hk = i / k_tiles % s.Hkv, t = i % k_tiles;
      const int64_t n0 = t * kBN, n = std::min(kBN, s.Lk - n0);
      C* kt = packed + i * tile_elems;
      pack_b_cols<C>(kt, kBN, k, b, hk, n0, n, D, Kd);
      pack_b_rows<C>(kt + Kd * kBN, v, b, hk, n0, n, kBN, D);
    }
  });

  for_each_unit(
      s.B * s.Hq * q_tiles, [&] { return Scratch<C>(Kd, Dp); },
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
          const C* kt = packed + ((b * s.Hkv + hk) * k_tiles + t) * tile_elems;
          gemm(rows, kBN, Kd, w.q.data(), Kd, kt, kBN, w.s.data(), kBN, false);  // Q K^T
          const bool partial = kind == Kind::kPartial;
          const int32_t* kdoc = keys.tile_doc(b, t);
          const int32_t* lo = keys.tile_lo(b, t);
          const int32_t* hi = keys.tile_hi(b, t);
          for (int64_t r = 0; r < rows; ++r) {
            float* Sr = w.s.data() + r * kBN;
            const float m_old = w.m[r];
            const float m_new =
                std::max(m_old, mask_and_max<C>(Sr, scale, partial, qdoc[r], level[r], kdoc, lo, hi));
            if (m_new == -kInf) {  // no key seen yet: this tile adds nothing to the row
              std::fill(P + r * kBN, P + (r + 1) * kBN, C(0));
              continue;
            }
            const Vec vm(m_new), vlog2e(kLog2e);
            Vec vsum(0.f);
            for (int64_t j = 0; j < kBN; j += kW) {
              const Vec p = exp2v((Vec::loadu(Sr + j) - vm) * vlog2e);  // e^(s - m')
              p.store(Sr + j);
              vsum = vsum + p;
            }
            store_row(P + r * kBN, Sr, kBN);
            if (m_new != m_old && m_old != -kInf) {  // rescale by e^(m - m')
              const float alpha = std::exp(m_old - m_new);
              w.l[r] *= alpha;
              float* Or = w.o.data() + r * Dp;
              const Vec va(alpha);
              for (int64_t d = 0; d < Dp; d += kW) (Vec::loadu(Or + d) * va).store(Or + d);
            }
            w.l[r] += hsum(vsum);
            w.m[r] = m_new;
          }
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
