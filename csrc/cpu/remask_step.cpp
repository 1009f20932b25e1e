// C++ CPU kernels of llada::remask_step and llada::remask_step_stats (the same pass over a
// vocabulary shard, stopped before the selection), and the llada::gumbel_from_bits test hook.
//
// Semantics: llada_kernels/reference/remask.py (the truth) and the docstring of
// llada_kernels.remask_step. Shared with the CUDA and Triton kernels: common/random.h (the
// noise) and common/remask.h (selection keys, tie-breaking, the per-row bound).
//
// Per candidate position (b, l) (x == mask_id and l < block_end[b]), r = b * L + l:
//   l_v    the fp32 logit of id v, after CFG: un + (s + 1) (cond - un); -inf for suppress_ids
//   z_v    l_v, and -inf for zero_confidence_ids too: the confidence logits
//   m, m2  the largest and second largest z_v;  S = sum_v exp(z_v - m)
// Choice       x0 = the first NaN l_v, else the first +inf, at any temperature;   (non-finite)
//              x0 = the lowest id not suppressed if every l_v is -inf;
//              x0 = argmax_v l_v, lowest id on ties                          (T = 0)
//              x0 = argmax_v min(fma(T, g(r, v), l_v), FLT_MAX), g Gumbel (common/random.h),
//                   lowest id on ties                                         (T > 0)
// Confidence   low_confidence  p[x0]       = exp(z[x0] - m) / S
//              margin          p1 - p2     = 1/S - exp(m2 - m) / S
//              entropy         sum p log p = (sum_v e_v t_v) / S - log S,
//                                            t_v = z_v - m, e_v = exp(t_v), 0 where e_v = 0
//              random          remask_uniform(seed, r)
//              A row without a finite m (all -inf, or a +inf/NaN confidence logit) scores 0,
//              as the reference's nan_to_num does (common/remask.h states the contract).
// Editing      with edit_threshold, an editable position holding a committed token is scored
//              the same way, in the same parallel pass, and takes x0 iff x0 != x and
//              confidence > fp32(edit_threshold) (common/remask.h); it is not selected.
// Both come from a position's statistics (ShardStats: the choice x0 and its value y, m, S and
// one more number per mode), which remask_step_stats returns for a shard of the vocabulary
// (ids [off, off + V), every id global: the noise of id v is keyed by v) and remask_step turns
// into a confidence at once.
//
// Cost. Non-candidates cost nothing. A candidate's row (LLaDA: V = 126464, 247 KiB in bf16)
// is read by three passes that hit L2 after the first: the max (and runner-up), the first id
// holding the max (stops early), the exponential sums (a 12-operation exp, exp_nonpositive).
// suppress_ids and zero_confidence_ids never reach these loops: a row is cut into the runs of
// ids between them. At T > 0 the noise is drawn only for ids that could still win
// (noisy_argmax). Rows are spread over threads with at::parallel_for; the selection (one
// nth_element over a row's keys) runs after all rows are scored.
//
// Every logit goes through the same Vectorized<float> code, full vectors and padded tails
// alike, so the max found by one pass is found again, bit for bit, by the next. The CFG
// combine may be contracted to an fma by the compiler (eager PyTorch rounds twice): at most
// one ulp apart.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <iterator>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/random.h"
#include "common/remask.h"
#include "isa.h"

namespace llada {
namespace CPU_CAPABILITY {  // one copy per CPU capability (isa.h)
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kMax = std::numeric_limits<float>::max();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Every value of gumbel_from_bits is below this (its largest, at all-ones bits, is
// 54 log 2 = 37.43): fma(T, kGumbelBound, l_v) bounds the noisy logit of id v.
constexpr float kGumbelBound = 38.0f;

// Which draws can give Gumbel noise g >= G? From gumbel_from_bits (common/random.h), with
// n = bits >> 11, u = (n + 1/2) 2^-53 and g = -log(-log u): if u < 1/2, g < 0.3665; else
// -log u >= 1 - u = w = (m + 1/2) 2^-53 with m = ~bits >> 11, so g <= -log w <= 53 log 2 - log m.
// So for G > log 2, g >= G needs m <= 2^53 e^-G: the cap returned (UINT64_MAX: any draw).
inline uint64_t draw_cap(double G) {
  if (!(G > 0.7)) return std::numeric_limits<uint64_t>::max();  // NaN too
  return static_cast<uint64_t>(std::ldexp(std::exp(-G), 53)) + 1;
}

// ---------------------------------------------------------------------------------------------
// Reading a row
// ---------------------------------------------------------------------------------------------

template <typename T>
inline Vec load_fp32(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// n < kW elements; the other lanes are 0.
template <typename T>
inline Vec load_fp32_partial(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
    __at_align__ float buf[kW] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return Vec::loadu(buf);
  }
}

// One row of logits as fp32, combined on the fly with the unconditional row under CFG. Ids are
// global: the row holds ids [off, off + V) (off = 0 but for a vocabulary shard).
template <typename T, bool kCfg>
struct Row {
  const T* cond;
  const T* uncond;  // kCfg only
  Vec scale;        // cfg_scale + 1
  int64_t off;      // the id of cond[0]

  // c: the conditional logits of ids [v, v + n).
  Vec combine(Vec c, int64_t v, int64_t n) const {
    if constexpr (kCfg) {
      const T* u = uncond + (v - off);
      const Vec un = n == kW ? load_fp32(u) : load_fp32_partial(u, n);
      return un + scale * (c - un);
    } else {
      return c;
    }
  }
  // Ids [v, v + kW).
  Vec at(int64_t v) const { return combine(load_fp32(cond + (v - off)), v, kW); }
  // Ids [v, v + n), n <= kW; the other lanes hold `fill`.
  Vec at(int64_t v, int64_t n, float fill) const {
    if (n == kW) return at(v);
    return Vec::set(Vec(fill), combine(load_fp32_partial(cond + (v - off), n), v, n), n);
  }
  float one(int64_t v) const {
    __at_align__ float buf[kW];
    at(v, 1, 0.f).store(buf);
    return buf[0];
  }
};

// Ids [begin, end) with none of the special ids inside.
struct Run {
  int64_t begin, end;
};

// [lo, hi) minus `cut` (sorted, unique, inside [lo, hi)), as maximal non-empty runs.
std::vector<Run> runs_between(const std::vector<int64_t>& cut, int64_t lo, int64_t hi) {
  std::vector<Run> runs;
  int64_t begin = lo;
  for (const int64_t id : cut) {
    if (id > begin) runs.push_back({begin, id});
    begin = id + 1;
  }
  if (hi > begin) runs.push_back({begin, hi});
  return runs;
}

// ---------------------------------------------------------------------------------------------
// The passes over a row
// ---------------------------------------------------------------------------------------------

struct Top2 {
  float m, m2;  // largest and second largest, duplicates counted; NaN if any NaN
};

// Pass 1: max (and with kTop2 the runner-up) of the row over `runs`. Two accumulators per
// statistic hide the latency of vmaxps.
template <bool kTop2, class R>
Top2 row_max(const R& row, const std::vector<Run>& runs) {
  Vec m0(-kInf), m1(-kInf), s0(-kInf), s1(-kInf);
  auto take = [](Vec x, Vec& m, Vec& s) {
    if constexpr (kTop2) s = at::vec::maximum(s, at::vec::minimum(m, x));
    m = at::vec::maximum(m, x);
  };
  for (const auto [begin, end] : runs) {
    int64_t v = begin;
    for (; v + 2 * kW <= end; v += 2 * kW) {
      take(row.at(v), m0, s0);
      take(row.at(v + kW), m1, s1);
    }
    for (; v < end; v += kW) take(row.at(v, std::min(kW, end - v), -kInf), m0, s0);
  }
  // The top two of the union of streams lie among each stream's top two.
  __at_align__ float lanes[4 * kW];
  m0.store(lanes);
  m1.store(lanes + kW);
  s0.store(lanes + 2 * kW);
  s1.store(lanes + 3 * kW);
  Top2 top{-kInf, -kInf};
  for (const float f : lanes) {
    if (std::isnan(f)) return {kNaN, kNaN};
    if (f > top.m) {
      top.m2 = top.m;
      top.m = f;
    } else if (f > top.m2) {
      top.m2 = f;
    }
  }
  if (!kTop2) top.m2 = kNaN;  // the s lanes were never filled
  return top;
}

// The first id in `runs` whose value is `target` (NaN: the first NaN, as torch.argmax), or -1.
template <class R>
int64_t find_first(const R& row, const std::vector<Run>& runs, float target) {
  const bool nan = std::isnan(target);
  const float fill = nan ? -kInf : kNaN;  // a padding lane never matches
  const Vec t(target);
  for (const auto [begin, end] : runs) {
    for (int64_t v = begin; v < end; v += kW) {
      const Vec x = row.at(v, std::min(kW, end - v), fill);
      const Vec hit = nan ? x.isnan() : (x == t);
      // zero_mask() sets the bits of zero lanes; a hit lane is all ones, so non-zero.
      const int bits = ~hit.zero_mask() & ((1 << kW) - 1);
      if (bits) return v + __builtin_ctz(bits);
    }
  }
  return -1;
}

// x0 = argmax_v min(fma(T, g(r, v), l_v), FLT_MAX) over `runs`, lowest id on ties, for a row
// of finite and -inf logits (the caller handles NaN and +inf); -1 if every value is -inf. The
// clamp keeps an overflowing noisy logit below a +inf one. `start` (or -1) is a good guess,
// the argmax of l, whose noisy value is the first best so far. Ids go in blocks of 16 from an
// even id, with lmax their largest l:
//   fma(T, kGumbelBound, lmax) < best   no id can win: no draw at all;
//   otherwise                            8 Philox calls (the compiler vectorises them), and
//                                        only ids whose draw could give g >= (best - lmax) / T
//                                        (draw_cap) pay for logarithms: once the best is a
//                                        few units above lmax, a small fraction (e^-G).
// The tests are conservative (a margin covers the rounding of fma and of the logarithms), so
// skipping is exact: the result does not depend on `start`, only the cost does.
// Returns x0 and its noisy value.
struct Best {
  int64_t arg;
  float value;
};

template <class R>
Best noisy_argmax(const R& row, const std::vector<Run>& runs, float T, uint64_t seed, int64_t r,
                  int64_t start) {
  float best = -kInf;
  int64_t arg = -1;
  if (start >= 0) {
    uint64_t even, odd;
    gumbel_bits_pair(seed, r, start >> 1, even, odd);
    const float g = gumbel_from_bits((start & 1) ? odd : even);
    const float y = std::min(std::fma(T, g, row.one(start)), kMax);
    if (y > best) {
      best = y;
      arg = start;
    }
  }
  constexpr int64_t kPairs = kW, kBlock = 2 * kPairs;
  __at_align__ float l[kBlock];
  uint64_t draws[kBlock];  // even ids' draws, then odd ids'
  for (const auto [begin, end] : runs) {
    for (int64_t v0 = begin & ~int64_t(1); v0 < end; v0 += kBlock) {
      // l of ids [v0, v0 + kBlock) that lie in the run; -inf for the others.
      const int64_t lo = std::max(v0, begin), hi = std::min(v0 + kBlock, end);
      std::fill(l, l + kBlock, -kInf);
      for (int64_t v = lo; v < hi; v += kW) {
        const int64_t n = std::min(kW, hi - v);
        row.at(v, n, -kInf).store(l + (v - v0), n);
      }
      float lmax = -kInf;
      for (const float li : l) lmax = std::max(lmax, li);
      if (!(std::fma(T, kGumbelBound, lmax) >= best)) continue;
      for (int64_t i = 0; i < kPairs; ++i) {
        gumbel_bits_pair(seed, r, (v0 >> 1) + i, draws[i], draws[kPairs + i]);
      }
      // fma(T, g, l) >= best needs T g + l >= best - ulp(best), so g >= G below.
      const double G = (static_cast<double>(best) - std::abs(best) * 0x1p-23 - lmax) / T - 1e-3;
      const uint64_t cap = draw_cap(G);
      for (int64_t i = 0; i < kBlock; ++i) {
        const uint64_t draw = draws[(i & 1) * kPairs + (i >> 1)];
        if ((~draw >> 11) > cap) continue;
        const float y = std::min(std::fma(T, gumbel_from_bits(draw), l[i]), kMax);
        const int64_t v = v0 + i;
        if (y > best || (y == best && v < arg)) {
          best = y;
          arg = v;
        }
      }
    }
  }
  return {arg, best};
}

// exp(t) for t <= 0 in 12 vector operations, within 2e-7 relative (exp_u20 takes 17 and
// allows 20 ulp). t = n ln2 + r with n = round(t / ln2) and |r| <= ln2/2; exp(r) =
// 1 + r + r^2 (c2 + c3 r + c4 r^2 + c5 r^3), fitted to the relative error on that interval;
// 2^n is written into the exponent bits. t is clamped at -87 so that 2^n stays normal:
// exp(-inf) gives 1.6e-38, not 0, which moves a sum of V such terms and at least one 1
// (the max) by less than V * 1.6e-38.
inline Vec exp_nonpositive(Vec t) {
  using IVec = at::vec::Vectorized<int32_t>;
  t = at::vec::clamp_min(t, Vec(-87.f));
  const Vec round(12582912.f);  // 1.5 * 2^23: x + round - round is x rounded to an integer
  const Vec n = at::vec::fmadd(t, Vec(1.44269504f), round) - round;
  const Vec r = at::vec::fnmadd(n, Vec(0.693147182f), t);
  Vec q = at::vec::fmadd(Vec(0.008333837613463402f), r, Vec(0.04189857840538025f));
  q = at::vec::fmadd(q, r, Vec(0.1666688621044159f));
  q = at::vec::fmadd(q, r, Vec(0.49999141693115234f));
  const Vec e = at::vec::fmadd(q * r, r, r) + Vec(1.f);
  const IVec biased = at::vec::convert_to_int_of_same_size(n + Vec(127.f));
  return e * at::vec::cast<float>(biased << IVec(23));
}

// Pass 3: S = sum_v exp(z_v - m) and, with kEntropy, sum_v exp(t_v) t_v (t_v = z_v - m,
// clamped as exp_nonpositive does, so that -inf gives a vanishing term, not NaN). m is finite.
template <bool kEntropy, class R>
void exp_sums(const R& row, const std::vector<Run>& runs, float m, float& sum, float& sum_et) {
  const Vec vm(m), lo(-87.f);
  Vec s0(0.f), s1(0.f), h0(0.f), h1(0.f);
  for (const auto [begin, end] : runs) {
    int64_t v = begin;
    for (; v + 2 * kW <= end; v += 2 * kW) {
      const Vec t0 = row.at(v) - vm, t1 = row.at(v + kW) - vm;
      const Vec e0 = exp_nonpositive(t0), e1 = exp_nonpositive(t1);
      s0 = s0 + e0;
      s1 = s1 + e1;
      if constexpr (kEntropy) {
        h0 = at::vec::fmadd(e0, at::vec::clamp_min(t0, lo), h0);
        h1 = at::vec::fmadd(e1, at::vec::clamp_min(t1, lo), h1);
      }
    }
    for (; v < end; v += kW) {
      const Vec t = row.at(v, std::min(kW, end - v), -kInf) - vm;
      const Vec e = exp_nonpositive(t);
      s0 = s0 + e;
      if constexpr (kEntropy) h0 = at::vec::fmadd(e, at::vec::clamp_min(t, lo), h0);
    }
  }
  auto total = [](Vec a) {
    __at_align__ float lanes[kW];
    a.store(lanes);
    float acc = 0.f;
    for (const float f : lanes) acc += f;
    return acc;
  };
  sum = total(s0 + s1);
  sum_et = kEntropy ? total(h0 + h1) : 0.f;
}

// ---------------------------------------------------------------------------------------------
// One position: choice and confidence
// ---------------------------------------------------------------------------------------------

struct Params {
  int64_t L;
  int64_t off;                   // the vocabulary id of the logits' first column
  int64_t stride_b, stride_l;    // of logits
  int64_t ustride_b, ustride_l;  // of uncond_logits
  float scale;                   // cfg_scale + 1
  float temperature;
  Remasking mode;
  uint64_t seed;
  std::vector<int64_t> cut;        // suppress_ids and zero_confidence_ids, sorted, unique
  std::vector<int64_t> zero_only;  // zero_confidence_ids that are not suppressed
  std::vector<Run> choice_runs;    // ids that x0 may take: [off, off + V) minus suppress_ids
  std::vector<Run> conf_runs;      // ids in the confidence softmax: [off, off + V) minus cut
  int64_t first_allowed;           // the lowest id not suppressed (-1: none in the shard)
};

// A position's statistics over the row (or shard): everything its confidence needs
// (llada::remask_step_stats in csrc/ops.cpp states them for a merge across shards).
struct ShardStats {
  int64_t x0;  // the choice, or -1 (every id of the shard suppressed)
  float y;     // x0's value: NaN or +inf (the first such id), the (noisy) max, or -inf
  float m;     // max of the confidence logits z (NaN if one is NaN)
  float s;     // sum exp(z - m), when m is finite (else 0)
  float aux;   // z[x0] (low_confidence), the runner-up of z (margin), sum e t (entropy), u
};

template <class R>
ShardStats shard_stats(const R& row, const Params& p, int64_t r) {
  const Top2 top = p.mode == Remasking::Margin ? row_max<true>(row, p.conf_runs)
                                               : row_max<false>(row, p.conf_runs);
  // The max of l over the choice runs: the max over the confidence runs, and the
  // zero-confidence ids.
  float lmax = top.m;
  for (const int64_t v : p.zero_only) {
    const float f = row.one(v);
    if (std::isnan(f) || f > lmax) lmax = f;
  }
  // x0 (common/remask.h): the first id at the max when it is NaN or +inf (noise cannot move
  // it) or at T = 0; the lowest allowed id if every value is -inf; else Gumbel-max.
  ShardStats st{lmax == -kInf ? -1 : find_first(row, p.choice_runs, lmax), lmax, top.m, 0.f, 0.f};
  if (p.temperature > 0 && st.x0 >= 0 && lmax < kInf) {
    const Best best = noisy_argmax(row, p.choice_runs, p.temperature, p.seed, r, st.x0);
    st.x0 = best.arg;
    st.y = best.value;
  }
  if (st.x0 < 0) st.x0 = p.first_allowed;  // every (noisy) value is -inf

  if (p.mode == Remasking::Random) {
    st.aux = remask_uniform(p.seed, r);
  } else if (p.mode == Remasking::Margin) {
    st.aux = top.m2;
  } else if (p.mode == Remasking::LowConfidence) {  // -inf (p = 0) if x0 is a cut id
    const bool cut = st.x0 < 0 || std::binary_search(p.cut.begin(), p.cut.end(), st.x0);
    st.aux = cut ? -kInf : row.one(st.x0);
  }
  if (p.mode != Remasking::Random && std::isfinite(top.m)) {
    float sum_et = 0.f;
    if (p.mode == Remasking::Entropy) {
      exp_sums<true>(row, p.conf_runs, top.m, st.s, sum_et);
      st.aux = sum_et;
    } else {
      exp_sums<false>(row, p.conf_runs, top.m, st.s, sum_et);
    }
  }
  return st;
}

// The confidence of a position from the statistics of its whole row: 0 where m is not finite
// or the formula gives NaN (nan_to_num), and -0 -> +0 so that the key orders it with +0.
float confidence(const ShardStats& st, Remasking mode) {
  float c = 0.f;
  if (mode == Remasking::Random) {
    c = st.aux;
  } else if (std::isfinite(st.m)) {
    if (mode == Remasking::Entropy) {
      c = st.aux / st.s - std::log(st.s);
    } else if (mode == Remasking::Margin) {
      c = 1.f / st.s - std::exp(st.aux - st.m) / st.s;
    } else {
      c = std::exp(st.aux - st.m) / st.s;  // low_confidence
    }
  }
  return std::isnan(c) ? 0.f : c + 0.f;
}

// Calls emit(i, r, stats) for positions [begin, end) (cand[i] = r = b * L + l).
template <typename T, bool kCfg, class Emit>
void score_candidates(const at::Tensor& logits, const at::Tensor* uncond, const Params& p,
                      const int64_t* cand, int64_t begin, int64_t end, const Emit& emit) {
  const T* base = logits.const_data_ptr<T>();
  const T* ubase = kCfg ? uncond->const_data_ptr<T>() : nullptr;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t r = cand[i], b = r / p.L, l = r % p.L;
    Row<T, kCfg> row{base + b * p.stride_b + l * p.stride_l,
                     kCfg ? ubase + b * p.ustride_b + l * p.ustride_l : nullptr, Vec(p.scale),
                     p.off};
    emit(i, r, shard_stats(row, p, r));
  }
}

// ---------------------------------------------------------------------------------------------
// The operators
// ---------------------------------------------------------------------------------------------

// The ids in [lo, hi), sorted, unique; negative ids are refused (ids of other shards, at or
// above hi, belong to them; below lo too).
std::vector<int64_t> sorted_ids(at::IntArrayRef ids, int64_t lo, int64_t hi, bool shard,
                                const char* name) {
  std::vector<int64_t> out;
  for (const int64_t id : ids) {
    TORCH_CHECK(0 <= id && (shard || id < hi), "remask_step: ", name, " holds ", id,
                ", outside the vocabulary [0, ", hi, ")");
    if (lo <= id && id < hi) out.push_back(id);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// Checks what Python cannot see, and reads the arguments both operators share into Params.
Params setup(const at::Tensor& logits, const at::Tensor* uncond, double cfg_scale,
             const at::Tensor& x, const at::Tensor& block_end, double temperature,
             c10::string_view remasking, at::IntArrayRef suppress_ids,
             at::IntArrayRef zero_confidence_ids, const std::optional<at::Tensor>& seed,
             int64_t vocab_offset, bool shard) {
  TORCH_CHECK(logits.dim() == 3, "remask_step: logits must be [B, L, V]; got ", logits.sizes());
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK(logits.stride(2) == 1 || V == 1,
              "remask_step: logits must have unit stride along V; got strides ", logits.strides());
  if (uncond) {
    TORCH_CHECK(uncond->scalar_type() == logits.scalar_type() && uncond->sizes() == logits.sizes(),
                "remask_step: uncond_logits must match logits (", logits.scalar_type(), " ",
                logits.sizes(), "); got ", uncond->scalar_type(), " ", uncond->sizes());
    TORCH_CHECK(uncond->stride(2) == 1 || V == 1,
                "remask_step: uncond_logits must have unit stride along V; got strides ",
                uncond->strides());
  }
  TORCH_CHECK(x.scalar_type() == at::kLong && x.dim() == 2 && x.size(0) == B && x.size(1) == L,
              "remask_step: x must be int64 [B, L] = [", B, ", ", L, "]; got ", x.scalar_type(),
              " ", x.sizes());
  TORCH_CHECK(block_end.scalar_type() == at::kLong && block_end.dim() == 1 &&
                  block_end.size(0) == B && block_end.is_contiguous(),
              "remask_step: block_end must be a contiguous int64 [B] = [", B, "] tensor; got ",
              block_end.scalar_type(), " ", block_end.sizes());
  TORCH_CHECK(vocab_offset >= 0, "remask_step: vocab_offset must be >= 0");  // one string: see test_cpu_isa
  Params p;
  p.mode = parse_remasking(remasking);
  const bool needs_seed = temperature > 0 || p.mode == Remasking::Random;
  TORCH_CHECK(!needs_seed || (seed.has_value() && seed->numel() == 1 &&
                              seed->scalar_type() == at::kLong && seed->device().is_cpu()),
              "remask_step: temperature > 0 and remasking='random' need seed, a [1] int64 CPU "
              "tensor");
  p.L = L;
  p.off = vocab_offset;
  p.stride_b = logits.stride(0);
  p.stride_l = logits.stride(1);
  p.ustride_b = uncond ? uncond->stride(0) : 0;
  p.ustride_l = uncond ? uncond->stride(1) : 0;
  p.scale = static_cast<float>(cfg_scale + 1.0);
  p.temperature = static_cast<float>(temperature);
  p.seed = needs_seed ? static_cast<uint64_t>(seed->const_data_ptr<int64_t>()[0]) : 0;
  const int64_t lo = vocab_offset, hi = vocab_offset + V;
  const std::vector<int64_t> suppress = sorted_ids(suppress_ids, lo, hi, shard, "suppress_ids");
  const std::vector<int64_t> zero =
      sorted_ids(zero_confidence_ids, lo, hi, shard, "zero_confidence_ids");
  std::set_union(suppress.begin(), suppress.end(), zero.begin(), zero.end(),
                 std::back_inserter(p.cut));
  std::set_difference(zero.begin(), zero.end(), suppress.begin(), suppress.end(),
                      std::back_inserter(p.zero_only));
  p.choice_runs = runs_between(suppress, lo, hi);
  p.conf_runs = runs_between(p.cut, lo, hi);
  p.first_allowed = p.choice_runs.empty() ? (shard ? -1 : 0) : p.choice_runs.front().begin;
  return p;
}

// The candidates (x == mask_id and l < block_end[b]), row by row: cand[row_start[b] ..
// row_start[b + 1]) holds r = b * L + l.
void candidates(const at::Tensor& x, const at::Tensor& block_end, int64_t mask_id,
                std::vector<int64_t>& cand, std::vector<int64_t>& row_start) {
  const int64_t B = x.size(0), L = x.size(1);
  const int64_t* xs = x.const_data_ptr<int64_t>();
  const int64_t* ends = block_end.const_data_ptr<int64_t>();
  row_start.assign(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t end = std::clamp<int64_t>(ends[b], 0, L);
    for (int64_t l = 0; l < end; ++l) {
      if (xs[b * x.stride(0) + l * x.stride(1)] == mask_id) cand.push_back(b * L + l);
    }
    row_start[b + 1] = static_cast<int64_t>(cand.size());
  }
}

// The positions token editing may change: editable (all if undefined) and x != mask_id,
// appended to `out` as r = b * L + l.
void edit_positions(const at::Tensor& x, const at::Tensor* editable, int64_t mask_id,
                    std::vector<int64_t>& out) {
  const int64_t B = x.size(0), L = x.size(1);
  const int64_t* xs = x.const_data_ptr<int64_t>();
  const bool* ed = editable ? editable->const_data_ptr<bool>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t l = 0; l < L; ++l) {
      const bool may = !ed || ed[b * editable->stride(0) + l * editable->stride(1)];
      if (may && xs[b * x.stride(0) + l * x.stride(1)] != mask_id) out.push_back(b * L + l);
    }
  }
}

// emit(i, r, stats) for every position in cand, in parallel, at least about 16 K logits per task.
template <class Emit>
void score_all(const at::Tensor& logits, const at::Tensor* uncond, const Params& p,
               const std::vector<int64_t>& cand, const Emit& emit) {
  const int64_t n = static_cast<int64_t>(cand.size()), V = logits.size(2);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(V, 1));
  auto run = [&](auto tag, auto cfg) {
    using T = decltype(tag);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      score_candidates<T, decltype(cfg)::value>(logits, uncond, p, cand.data(), begin, end, emit);
    });
  };
  auto run_dtype = [&](auto tag) {
    if (uncond) {
      run(tag, std::true_type{});
    } else {
      run(tag, std::false_type{});
    }
  };
  switch (logits.scalar_type()) {
    case at::kFloat: run_dtype(float{}); break;
    case at::kBFloat16: run_dtype(c10::BFloat16{}); break;
    case at::kHalf: run_dtype(c10::Half{}); break;
    default:
      TORCH_CHECK(false, "remask_step: logits must be float32, bfloat16 or float16; got ",
                  logits.scalar_type());
  }
}

std::tuple<at::Tensor, at::Tensor> remask_step_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits, double cfg_scale,
    const at::Tensor& x, const at::Tensor& num_transfer, const at::Tensor& block_end,
    int64_t mask_id, double temperature, c10::string_view remasking,
    std::optional<double> threshold, at::IntArrayRef suppress_ids,
    at::IntArrayRef zero_confidence_ids, const std::optional<at::Tensor>& seed,
    std::optional<double> edit_threshold, const std::optional<at::Tensor>& editable) {
  const at::Tensor* uncond = uncond_logits.has_value() ? &*uncond_logits : nullptr;
  const Params p = setup(logits, uncond, cfg_scale, x, block_end, temperature, remasking,
                         suppress_ids, zero_confidence_ids, seed, 0, false);
  const int64_t B = x.size(0), L = x.size(1);
  TORCH_CHECK(!edit_threshold || p.mode == Remasking::LowConfidence,  // one string: test_cpu_isa
              "remask_step: edit_threshold needs remasking='low_confidence'");
  if (editable) {
    TORCH_CHECK(editable->scalar_type() == at::kBool && editable->sizes() == x.sizes(),
                "remask_step: editable must be bool [B, L] = [", B, ", ", L, "]; got ",
                editable->scalar_type(), " ", editable->sizes());
  }
  TORCH_CHECK(num_transfer.scalar_type() == at::kLong && num_transfer.dim() == 1 &&
                  num_transfer.size(0) == B && num_transfer.is_contiguous(),
              "remask_step: num_transfer must be a contiguous int64 [B] = [", B, "] tensor; got ",
              num_transfer.scalar_type(), " ", num_transfer.sizes());
  std::vector<int64_t> cand, row_start;
  candidates(x, block_end, mask_id, cand, row_start);
  // Editing: the positions it may change follow the candidates in `cand`, scored in the same
  // pass; key[i] says whether position i is edited (kEdited) or not (kNoCandidate).
  const int64_t n_cand = static_cast<int64_t>(cand.size());
  if (edit_threshold) edit_positions(x, editable ? &*editable : nullptr, mask_id, cand);
  const float edit_t = edit_threshold ? static_cast<float>(*edit_threshold) : 0.f;
  const int64_t* xs = x.const_data_ptr<int64_t>();
  std::vector<int64_t> x0(cand.size()), key(cand.size());
  score_all(logits, uncond, p, cand, [&](int64_t i, int64_t r, const ShardStats& st) {
    x0[i] = st.x0;
    const float conf = confidence(st, p.mode);
    if (i < n_cand) {
      key[i] = selection_key(conf, r % p.L);
    } else {
      const int64_t token = xs[r / p.L * x.stride(0) + r % p.L * x.stride(1)];
      key[i] = st.x0 != token && conf > edit_t ? kEdited : kNoCandidate;
    }
  });

  // Select and write, row by row (common/remask.h).
  at::Tensor x_new = at::empty({B, L}, x.options());
  x_new.copy_(x);
  at::Tensor transfer = at::zeros({B, L}, x.options().dtype(at::kBool));
  int64_t* out = x_new.mutable_data_ptr<int64_t>();
  bool* written = transfer.mutable_data_ptr<bool>();
  const int64_t* ks = num_transfer.const_data_ptr<int64_t>();
  const std::optional<int64_t> tkey =
      threshold ? std::optional(threshold_key(static_cast<float>(*threshold))) : std::nullopt;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> scratch;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = row_start[b], count = row_start[b + 1] - begin;
      const int64_t k = std::max<int64_t>(ks[b], 0);
      int64_t bound;
      if (k >= count) {
        bound = kNoCandidate;
      } else if (k == 0) {
        bound = kCommitNone;
      } else {
        scratch.assign(key.begin() + begin, key.begin() + begin + count);
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                         std::greater<>());
        bound = scratch[k - 1];
      }
      if (tkey) bound = std::min(bound, *tkey);
      for (int64_t i = begin; i < begin + count; ++i) {
        if (key[i] >= bound) {
          out[cand[i]] = x0[i];
          written[cand[i]] = true;
        }
      }
    }
  });
  for (int64_t i = n_cand; i < static_cast<int64_t>(cand.size()); ++i) {
    if (key[i] == kEdited) {
      out[cand[i]] = x0[i];
      written[cand[i]] = true;
    }
  }
  return {x_new, transfer};
}

// llada::remask_step_stats: the statistics of every candidate over this vocabulary shard.
std::tuple<at::Tensor, at::Tensor> remask_step_stats_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits, double cfg_scale,
    const at::Tensor& x, const at::Tensor& block_end, int64_t mask_id, double temperature,
    c10::string_view remasking, at::IntArrayRef suppress_ids,
    at::IntArrayRef zero_confidence_ids, const std::optional<at::Tensor>& seed,
    int64_t vocab_offset) {
  const at::Tensor* uncond = uncond_logits.has_value() ? &*uncond_logits : nullptr;
  const Params p = setup(logits, uncond, cfg_scale, x, block_end, temperature, remasking,
                         suppress_ids, zero_confidence_ids, seed, vocab_offset, true);
  const int64_t B = x.size(0), L = x.size(1);
  at::Tensor stats = at::zeros({B, L, 4}, logits.options().dtype(at::kFloat));
  at::Tensor x0 = at::zeros({B, L}, x.options());
  float* st_out = stats.mutable_data_ptr<float>();
  int64_t* x0_out = x0.mutable_data_ptr<int64_t>();
  std::vector<int64_t> cand, row_start;
  candidates(x, block_end, mask_id, cand, row_start);
  score_all(logits, uncond, p, cand, [&](int64_t, int64_t r, const ShardStats& st) {
    x0_out[r] = st.x0;
    float* o = st_out + 4 * r;
    o[0] = st.y;
    o[1] = st.m;
    o[2] = st.s;
    o[3] = st.aux;
  });
  return {stats, x0};
}

at::Tensor gumbel_from_bits_cpu(const at::Tensor& bits) {
  TORCH_CHECK(bits.scalar_type() == at::kLong, "gumbel_from_bits: bits must be int64; got ",
              bits.scalar_type());
  const at::Tensor in = bits.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options().dtype(at::kFloat));
  const int64_t* src = in.const_data_ptr<int64_t>();
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, in.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) dst[i] = gumbel_from_bits(static_cast<uint64_t>(src[i]));
  });
  return out;
}

}  // namespace
}  // namespace CPU_CAPABILITY

LLADA_ISA_KERNEL(remask_step_stub, CPU_CAPABILITY::remask_step_cpu);
LLADA_ISA_KERNEL(remask_step_stats_stub, CPU_CAPABILITY::remask_step_stats_cpu);
LLADA_ISA_KERNEL(gumbel_from_bits_stub, CPU_CAPABILITY::gumbel_from_bits_cpu);

#ifdef CPU_CAPABILITY_DEFAULT  // registered once; each call runs the copy in use
TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("remask_step", LLADA_ISA_DISPATCH(remask_step_stub));
  m.impl("remask_step_stats", LLADA_ISA_DISPATCH(remask_step_stats_stub));
  m.impl("gumbel_from_bits", LLADA_ISA_DISPATCH(gumbel_from_bits_stub));
}
#endif

}  // namespace llada
