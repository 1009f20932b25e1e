// The backward of llada::attention_fwd on the CPU: llada::attention_bwd (schema: csrc/ops.cpp;
// what it shares with the forward, and the notation: attention.h).
//
// With delta_i = sum_d dO_id O_id - dlse_i (dlse: the gradient of the returned lse, or 0):
//   P = exp(S - lse),  dP = dO V^T,  dS = P (dP - delta),
//   dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K
// in one pass of five products per (query tile, key tile) pair that the mask does not skip,
// every one a row-major brgemm without transposes (the scale as in the forward, attention.h):
//   S^T = K Q^T,  dP^T = V dO^T,  dV += P^T dO,  dK += dS^T Q,  dQ^T += K^T dS^T
// (Q^T and dO^T are packed once per query tile; K, V, K^T once per key tile.)
//
// A work unit is one KV head (b, hk) and a chunk of its key tiles: it owns dK and dV of those
// keys (summed over the G query heads of the group) and walks every query tile of those heads,
// accumulating the tile's dQ^T over the chunk's keys. With one chunk per head (B Hkv >= threads)
// that is the whole dQ, written once. With C > 1 chunks each writes a partial dQ into
// dq_part[c] and a second pass sums the C partials in chunk order: no atomics, and the same bits
// for any thread count of one C. delta is formed per query tile where it is used (again by each
// chunk when C > 1: kBM^2 D per tile against the chunk's 5 kBM kBN D per key tile), by the very
// product that forms dP^T = V dO^T (same packing, same brgemm shape: the diagonal of O dO^T).
// Where one key dominates a row, O is that key's value row bit for bit, so dP - delta is exactly
// 0 there and dS = 0: no rounding noise for |Q| (up to 1e30) to multiply into dK and dQ.
// Extra memory: per thread one chunk's keys and one query tile, and the partial dQs when C > 1:
// never Lq x Lk. One parallel region (two when C > 1).

#include <torch/library.h>

#include "cpu/attention.h"

namespace llada::attn {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBM = 64;  // query tile (a multiple of 2 kW)
static_assert(kBM == kBN, "delta's product must have the shape of dP^T's");

// One thread's scratch. C = float: P^T and dS^T are written over S^T and dP^T.
template <typename C>
struct Scratch {
  std::vector<C> k, v, kt;          // the chunk's K, V [kBN x Kd] and K^T [D x kBN] per tile (A)
  std::vector<float> dk, dv;        // [chunk keys x Dp]
  std::vector<C> qt, dot;           // Q^T, dO^T [Kd x kBM] (B, reduced along D)
  std::vector<C> qs, dos;           // Q, dO [kBM x D] (B, reduced along the rows)
  std::vector<C> o;                 // O [kBM x Kd] (A), for delta
  std::vector<float> prod;          // O dO^T [kBM x kBM], for delta
  std::vector<float> dqt;           // dQ^T [D x kBM]
  std::vector<float> st, dpt;       // S^T, dP^T [kBN x kBM]
  std::vector<C> pt, dst, dst_b;    // P^T, dS^T (A) and dS^T as a B operand (bf16 only)
  std::vector<int32_t> qdoc, level; // [kBM]
  std::vector<float> lse, delta;    // [kBM]
  std::vector<Kind> kinds;          // [chunk tiles]
  Scratch(int64_t chunk_tiles, int64_t Kd, int64_t D, int64_t Dp) {
    const int64_t keys = chunk_tiles * kBN;
    const int64_t lowp = std::is_same_v<C, float> ? 0 : kBN * kBM;
    k.resize(keys * Kd), v.resize(keys * Kd), kt.resize(chunk_tiles * D * kBN);
    dk.resize(keys * Dp), dv.resize(keys * Dp);
    qt.resize(Kd * kBM), dot.resize(Kd * kBM), qs.resize(kBM * D), dos.resize(kBM * D);
    o.resize(kBM * Kd), prod.resize(kBM * kBM);
    dqt.resize(D * kBM), st.resize(kBN * kBM), dpt.resize(kBN * kBM);
    pt.resize(lowp), dst.resize(lowp), dst_b.resize(lowp);
    qdoc.resize(kBM), level.resize(kBM), lse.resize(kBM), delta.resize(kBM);
    kinds.resize(chunk_tiles);
  }
};

// One (query tile, key tile) pair's probabilities and score gradients, in place over S^T
// (becomes P^T) and dP^T (becomes dS^T). Row j is key j; column i is query i.
// qdoc, level, lse, delta: the query tile's [kBM]; kdoc, lo, hi: the key tile's [kBN].
template <typename C, bool kPartial>
void probabilities(float* st, float* dpt, const int32_t* qdoc, const int32_t* level_,
                   const float* lse, const float* delta, float scale, const int32_t* kdoc,
                   const int32_t* lo, const int32_t* hi) {
  const Vec vlog2e(kLog2e), zero(0.f), vscale(scale);
  for (int64_t j = 0; j < kBN; ++j) {
    float* S = st + j * kBM;
    float* dP = dpt + j * kBM;
    const IVec vd(kdoc[j]), vlo(lo[j]), vhi(hi[j]);
    for (int64_t i = 0; i < kBM; i += kW) {
      Vec s = Vec::loadu(S + i);  // scale q.k, or q.k
      if constexpr (!kScaleInQ<C>) s = opaque(s * vscale);
      if constexpr (kPartial) {
        const IVec level = IVec::loadu(level_ + i);
        const IVec hidden = (IVec::loadu(qdoc + i) != vd) | (level < vlo) | (level > vhi);
        s = Vec::blendv(s, Vec(-kInf), at::vec::cast<float>(hidden));
      }
      const Vec x = (s - Vec::loadu(lse + i)) * vlog2e;
      const Vec p = exp2v(at::vec::minimum(x, zero));  // e^(s - lse) <= 1
      p.store(S + i);
      (p * (Vec::loadu(dP + i) - Vec::loadu(delta + i))).store(dP + i);  // dS^T
    }
  }
}

template <typename T, typename C>
void backward(const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_,
              const at::Tensor& v_, const Mask& mask, const at::Tensor& out_, const float* lse,
              const float* dlse, float scale, at::Tensor& dq_, at::Tensor& dk_, at::Tensor& dv_) {
  const Dims s(q_, k_);
  const Rows<const T> dout(dout_), q(q_), k(k_), v(v_), out(out_);
  const Rows<T> dq(dq_), dk(dk_), dv(dv_);
  const int64_t D = s.D, Kd = round_up(D, kPair<C>), Dp = round_up(D, kW);
  const int64_t q_tiles = ceil_div(s.Lq, kBM), heads = s.B * s.Hkv;
  const KeyTiles keys = key_tiles(mask, s.B);
  const int64_t k_tiles = keys.tiles;
  const std::vector<QStats> qstats = query_stats(mask, s.B, kBM);
  // Key chunks per KV head: enough units for every thread when there are few heads.
  const int64_t want = std::min(k_tiles, ceil_div(at::get_num_threads(), heads));
  const int64_t chunk_tiles = ceil_div(k_tiles, want);
  const int64_t C_ = ceil_div(k_tiles, chunk_tiles), chunk_keys = chunk_tiles * kBN;
  // Partial dQs, dq_part[c, (b * Hq + h) * Lq + i, :] in fp32, only when C_ > 1.
  at::Tensor dq_part;
  if (C_ > 1) dq_part = at::empty({C_, s.B * s.Hq * s.Lq, Dp}, q_.options().dtype(at::kFloat));
  float* part = C_ > 1 ? dq_part.data_ptr<float>() : nullptr;

  // Writes dQ rows m0 .. m0 + rows of (b, h) from dQ^T (nullptr: zeros).
  const auto write_dq = [&](const float* dqt, int64_t b, int64_t h, int64_t m0, int64_t rows,
                            int64_t c) {
    const int64_t row0 = (b * s.Hq + h) * s.Lq + m0;
    for (int64_t r = 0; r < rows; ++r) {
      if (C_ == 1) {
        T* dst = dq.row(b, h, m0 + r);
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(dqt ? scale * dqt[d * kBM + r] : 0.f);
      } else {
        float* dst = part + (c * s.B * s.Hq * s.Lq + row0 + r) * Dp;
        for (int64_t d = 0; d < D; ++d) dst[d] = dqt ? dqt[d * kBM + r] : 0.f;
      }
    }
  };

  for_each_unit(
      heads * C_, [&] { return Scratch<C>(chunk_tiles, Kd, D, Dp); },
      [&](Scratch<C>& w, int64_t unit) {
        const int64_t b = unit / (s.Hkv * C_), hk = unit / C_ % s.Hkv, c = unit % C_;
        const int64_t k0 = c * chunk_keys, k1 = std::min(s.Lk, k0 + chunk_keys);
        const int64_t t0 = k0 / kBN, tiles = ceil_div(k1 - k0, kBN);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t n0 = k0 + t * kBN, n = std::min(kBN, k1 - n0);
          pack_a<C>(w.k.data() + t * kBN * Kd, Kd, k, b, hk, n0, n, kBN, D);
          pack_a<C>(w.v.data() + t * kBN * Kd, Kd, v, b, hk, n0, n, kBN, D);
          pack_a_transposed<C>(w.kt.data() + t * D * kBN, kBN, k, b, hk, n0, n, D);
        }
        std::fill(w.dk.begin(), w.dk.end(), 0.f);
        std::fill(w.dv.begin(), w.dv.end(), 0.f);

        for (int64_t h = hk * s.G; h < (hk + 1) * s.G; ++h) {
          for (int64_t tq = 0; tq < q_tiles; ++tq) {
            const int64_t m0 = tq * kBM, rows = std::min(kBM, s.Lq - m0);
            bool live = false;
            for (int64_t t = 0; t < tiles; ++t) {
              w.kinds[t] = classify(qstats[b * q_tiles + tq], keys.stats[b * k_tiles + t0 + t]);
              live |= w.kinds[t] != Kind::kSkip;
            }
            if (!live) {  // the mask hides every key of the chunk from this query tile
              write_dq(nullptr, b, h, m0, rows, c);
              continue;
            }
            const float q_scale = kScaleInQ<C> ? scale : 1.f;
            pack_b_cols<C>(w.qt.data(), kBM, q, b, h, m0, rows, D, Kd, q_scale);
            pack_b_cols<C>(w.dot.data(), kBM, dout, b, h, m0, rows, D, Kd);
            pack_b_rows<C>(w.qs.data(), q, b, h, m0, rows, kBM, D, q_scale);
            pack_b_rows<C>(w.dos.data(), dout, b, h, m0, rows, kBM, D);
            pack_a<C>(w.o.data(), Kd, out, b, h, m0, rows, kBM, D);
            gemm(kBM, kBM, Kd, w.o.data(), Kd, w.dot.data(), kBM, w.prod.data(), kBM, false);
            const int64_t row0 = (b * s.Hq + h) * s.Lq + m0;
            for (int64_t i = 0; i < kBM; ++i) {  // padded query rows get P = 0
              const bool in = i < rows;
              w.qdoc[i] = in ? mask.qdoc(b)[m0 + i] : 0;
              w.level[i] = in ? mask.level(b)[m0 + i] : 0;
              w.lse[i] = in ? lse[row0 + i] : kInf;
              // the diagonal of O dO^T, less the lse gradient (d lse_i / d S_ij = P_ij)
              w.delta[i] = in ? w.prod[i * kBM + i] - (dlse ? dlse[row0 + i] : 0.f) : 0.f;
            }
            std::fill(w.dqt.begin(), w.dqt.end(), 0.f);

            for (int64_t t = 0; t < tiles; ++t) {
              if (w.kinds[t] == Kind::kSkip) continue;
              const C* K = w.k.data() + t * kBN * Kd;
              const C* V = w.v.data() + t * kBN * Kd;
              gemm(kBN, kBM, Kd, K, Kd, w.qt.data(), kBM, w.st.data(), kBM, false);   // S^T
              gemm(kBN, kBM, Kd, V, Kd, w.dot.data(), kBM, w.dpt.data(), kBM, false); // dP^T
              (w.kinds[t] == Kind::kPartial ? probabilities<C, true> : probabilities<C, false>)(
                  w.st.data(), w.dpt.data(), w.qdoc.data(), w.level.data(), w.lse.data(),
                  w.delta.data(), scale, keys.tile_doc(b, t0 + t), keys.tile_lo(b, t0 + t),
                  keys.tile_hi(b, t0 + t));
              const C* Pt = w.pt.data();
              const C* dSt = w.dst.data();
              const C* dSt_b = w.dst_b.data();
              if constexpr (std::is_same_v<C, float>) {
                Pt = w.st.data(), dSt = w.dpt.data(), dSt_b = w.dpt.data();
              } else {
                store_row(w.pt.data(), w.st.data(), kBN * kBM);
                store_row(w.dst.data(), w.dpt.data(), kBN * kBM);
                for (int64_t j = 0; j < kBN; j += 2) {  // dS^T again, in VNNI pairs of keys
                  const C* r0 = w.dst.data() + j * kBM;
                  const C* r1 = r0 + kBM;
                  C* out = w.dst_b.data() + j * kBM;
                  for (int64_t i = 0; i < kBM; ++i) out[2 * i] = r0[i], out[2 * i + 1] = r1[i];
                }
              }
              float* dV = w.dv.data() + t * kBN * Dp;
              float* dK = w.dk.data() + t * kBN * Dp;
              gemm(kBN, D, kBM, Pt, kBM, w.dos.data(), D, dV, Dp, true);             // += P^T dO
              gemm(kBN, D, kBM, dSt, kBM, w.qs.data(), D, dK, Dp, true);             // += dS^T Q
              gemm(D, kBM, kBN, w.kt.data() + t * D * kBN, kBN, dSt_b, kBM, w.dqt.data(), kBM,
                   true);                                                              // += K^T dS^T
            }
            write_dq(w.dqt.data(), b, h, m0, rows, c);
          }
        }
        for (int64_t j = 0; j < k1 - k0; ++j) {
          T* dk_row = dk.row(b, hk, k0 + j);
          T* dv_row = dv.row(b, hk, k0 + j);
          for (int64_t d = 0; d < D; ++d) {
            dk_row[d] = static_cast<T>(kScaleInQ<C> ? w.dk[j * Dp + d] : scale * w.dk[j * Dp + d]);
            dv_row[d] = static_cast<T>(w.dv[j * Dp + d]);
          }
        }
      },
      release_products<C>);
  if (C_ == 1) return;
  // dq = scale * sum_c dq_part[c], summed in chunk order.
  const int64_t rows = s.B * s.Hq * s.Lq, stride = rows * Dp;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* dst = dq.row(i / (s.Hq * s.Lq), i / s.Lq % s.Hq, i % s.Lq);
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.f;
        for (int64_t c = 0; c < C_; ++c) acc += part[c * stride + i * Dp + d];
        dst[d] = static_cast<T>(scale * acc);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& q_mask, const std::optional<at::Tensor>& k_mask,
    const at::Tensor& out, const at::Tensor& lse, double scale,
    const std::optional<at::Tensor>& grad_lse) {
  check_inputs("attention_bwd", q, k, v, q_mask, k_mask);
  for (const at::Tensor* t : {&grad_out, &out}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->stride(3) == 1 && t->scalar_type() == q.scalar_type(),
                "attention_bwd (cpu): grad_out and out must be like q, with unit stride along D");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "attention_bwd (cpu): lse must be contiguous fp32 [B, Hq, Lq]");
  TORCH_CHECK(!grad_lse || (grad_lse->scalar_type() == at::kFloat && grad_lse->is_contiguous() &&
                            grad_lse->sizes() == lse.sizes()),
              "attention_bwd (cpu): grad_lse must be None or contiguous fp32 like lse");
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  if (q.numel() == 0 || k.size(2) == 0) {  // no query or no key: every gradient is zero
    dq.zero_();
    return {dq, dk, dv};
  }
  const MaskTensors masks = masks_or_all(q_mask, k_mask, q.size(0), q.size(2), k.size(2));
  const Mask m = masks.view();
  const float sc = static_cast<float>(scale);
  const auto run = [&](auto t_tag, auto c_tag) {
    using T = decltype(t_tag);
    using C = decltype(c_tag);
    backward<T, C>(grad_out, q, k, v, m, out, lse.data_ptr<float>(),
                   grad_lse ? grad_lse->data_ptr<float>() : nullptr, sc, dq, dk, dv);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}, float{}); break;
    case at::kHalf: run(at::Half{}, float{}); break;
    case at::kBFloat16:
      if (bf16_products()) {
        run(at::BFloat16{}, at::BFloat16{});
      } else {
        run(at::BFloat16{}, float{});
      }
      break;
    default:
      TORCH_CHECK(false, "attention_bwd (cpu): q must be float32, bfloat16 or float16; got ",
                  q.scalar_type());
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace CPU_CAPABILITY

LLADA_ISA_KERNEL(attention_bwd_stub, CPU_CAPABILITY::attention_bwd_cpu);

#ifdef CPU_CAPABILITY_DEFAULT  // registered once; each call runs the copy in use
TORCH_LIBRARY_IMPL(llada, CPU, m) { m.impl("attention_bwd", LLADA_ISA_DISPATCH(attention_bwd_stub)); }
#endif

}  // namespace llada::attn
