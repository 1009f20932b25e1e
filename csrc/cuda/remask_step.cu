// CUDA kernels of llada::remask_step (one LLaDA sampling step), llada::remask_step_stats (its
// score pass over a vocabulary shard, returning statistics instead of keys) and
// llada::gumbel_from_bits.
//
// The truth is llada_kernels/reference/remask.py; the contract shared with the CPU and Triton
// kernels is common/random.h (noise) and common/remask.h (selection keys). Two launches:
//
//   score   grid B*L, one block per position r = b*L + l. A candidate (x == mask_id and
//           l < block_end[b]) reads its V logits once and writes x0[r] and key[r]; with
//           editing, so does an editable position holding a committed token (x != mask_id),
//           whose key is kEdited (x0 != x and confidence > edit_threshold) or -1; any other
//           position writes key[r] = -1 and leaves.
//   select  grid B, one block per row: the k = num_transfer[b] largest keys by bisection, the
//           threshold, then x_new and transfer for the whole row (edited positions too).
//
// Score, in one pass over the row (ids v in [0, V), all in fp32):
//   l_v  = logits, or un + (s + 1) * (c - un) with classifier-free guidance;
//   ch_v = l_v, or -inf for suppress_ids                       (the choice logits)
//   cl_v = ch_v, or -inf for zero_confidence_ids               (the confidence logits)
//   x0   = argmax_v of ch_v + T * g_v, g_v ~ Gumbel (common/random.h), in torch.argmax order
//          (NaN above +inf above numbers, ties to the lowest id). A finite ch_v's noisy value
//          is clamped to FLT_MAX, so that NaN and +inf logits win whatever the noise; a row
//          of -inf takes first_allowed, the lowest id not suppressed (common/remask.h).
//   m = max cl,  s = sum exp(cl - m),  t = sum exp(cl - m) (cl - m),  m2 = 2nd largest cl
//   confidence: low_confidence  p(x0)  = exp(cl_x0 - m) / s
//               margin          p1 - p2 = 1 / s - exp(m2 - m) / s
//               entropy         sum p log p = t / s - log s
//               random          remask_uniform(seed, r)
// m, s and t are online: when the running max grows from m to m', s *= e^(m - m') and
// t = e^(m - m') (t + (m - m') s). A NaN confidence (a row with no finite cl, or a NaN or +inf
// logit) scores 0, as the reference's nan_to_num does; -0 scores +0, so that the keys order
// confidences exactly as fp32 comparisons do.
// Stats mode (remask_step_stats): the logits hold ids [off, off + V); every id the kernel sees
// is global (off + the column: special ids, the noise's key, x0), and the block writes the
// row's (best, m, s, best_cl | m2 | t | u) and x0 instead of the key (csrc/ops.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/random.h"
#include "common/remask.h"
#include "cuda/block_reduce.cuh"

namespace llada::cuda {
namespace {

constexpr float kInf = __builtin_huge_valf();
constexpr float kFltMax = 3.402823466e38f;
constexpr int kScoreThreads = 256;   // one block per position
// 16-byte loads in flight per thread and input. Noise (~100 instructions a logit) hides the
// latency of one load; the noise-free pass is memory bound and keeps four in flight.
template <bool kNoise>
constexpr int kUnroll = kNoise ? 1 : 4;
constexpr int kSelectThreads = 512;  // one block per row
constexpr int kSelectCapacity = 4096;  // candidate keys staged in shared memory (32 KiB)
constexpr int kMaxSpecialIds = 16;   // suppress_ids + zero_confidence_ids, after dedup
// An upper bound of every Gumbel draw of common/random.h (the largest is -log(2^-54) = 37.43).
constexpr float kGumbelMax = 37.5f;

// ---------------------------------------------------------------------------------------------
// Kernel 1: score every position.

// The special ids, passed by value in the kernel parameters: the first n_suppress are
// suppress_ids, the rest zero_confidence_ids. Indexed with constants only (unrolled loops).
struct SpecialIds {
  int32_t id[kMaxSpecialIds];
  int n_suppress;
  int n;
  int first_allowed;  // the lowest id not in suppress_ids (-1: none in the shard)
};

template <typename scalar_t>
struct ScoreParams {
  const scalar_t* logits;  // [B, L, V], unit stride along V
  const scalar_t* uncond;  // [B, L, V] or nullptr
  int64_t logits_stride_b, logits_stride_l, uncond_stride_b, uncond_stride_l;
  const int64_t* x;  // [B, L]
  int64_t x_stride_b, x_stride_l;
  const int64_t* block_end;  // [B]
  const int64_t* seed;       // [1], read only when noise or random remasking needs it
  int64_t* x0;               // [B * L] out, written at candidates (and edited positions)
  int64_t* key;              // [B * L] out, or nullptr in stats mode
  float* stats;              // [B * L, 4] out in stats mode, else nullptr
  const bool* editable;      // [B, L] or nullptr (every committed position), with editing
  int64_t editable_stride_b, editable_stride_l;
  bool editing;              // edit_threshold given (never in stats mode)
  float edit_threshold;      // fp32(edit_threshold)
  int64_t B, L, mask_id;
  int V;
  int vocab_offset;          // the global id of column 0 (0 but for a shard)
  float cfg_scale_plus_one;
  float temperature;
  float temperature_gumbel_max;  // fl(T * kGumbelMax), the largest noise a logit can get
  SpecialIds ids;
};

// One thread's (and, after the reduction, the block's) running statistics of a row.
struct RowStats {
  float best;     // the largest choice logit (plus noise at T > 0) so far
  int best_id;    // its id; INT32_MAX before any
  float best_cl;  // the confidence logit of best_id
  float m;        // max of the confidence logits
  float s;        // sum exp(cl - m)
  float t;        // sum exp(cl - m) * (cl - m)            (entropy)
  float m2;       // the second largest confidence logit   (margin)
};

__device__ __forceinline__ RowStats empty_stats() {
  return {-kInf, INT32_MAX, -kInf, -kInf, 0.f, 0.f, -kInf};
}

// torch.argmax order: NaN above everything, then larger values, then the lower id.
__device__ __forceinline__ bool beats(float v, int i, float w, int j) {
  const bool v_nan = v != v, w_nan = w != w;
  if (v_nan != w_nan) return v_nan;
  if (!v_nan && v != w) return v > w;
  return i < j;
}

template <Remasking kMode>
__device__ __forceinline__ RowStats merge(const RowStats& a, const RowStats& b) {
  RowStats out = beats(b.best, b.best_id, a.best, a.best_id) ? b : a;
  if constexpr (kMode != Remasking::Random) {
    const float m = fmaxf(a.m, b.m);
    float s = 0.f, t = 0.f;
    const auto rescaled = [&](const RowStats& x) {  // x's sums relative to the new max m
      if (x.s == 0.f) return;  // no finite confidence logit yet (and x.m = -inf)
      const float d = x.m - m, alpha = expf(d);
      s += x.s * alpha;
      if constexpr (kMode == Remasking::Entropy) t += alpha * fmaf(d, x.s, x.t);
    };
    rescaled(a);
    rescaled(b);
    out.m = m;
    out.s = s;
    out.t = t;
    if constexpr (kMode == Remasking::Margin) out.m2 = fmaxf(fminf(a.m, b.m), fmaxf(a.m2, b.m2));
  }
  return out;
}

// Fold the N consecutive logits lv (fp32, after guidance) of ids v0 .. v0 + N - 1 into st.
template <Remasking kMode, bool kNoise, int N, typename Params>
__device__ __forceinline__ void absorb(RowStats& st, const float (&lv)[N], int v0,
                                       const Params& p, uint64_t seed, int64_t r) {
  // Special ids in this chunk: bit i of `suppress` / `zero` is set when v0 + i is listed.
  uint32_t suppress = 0, zero = 0;
#pragma unroll
  for (int j = 0; j < kMaxSpecialIds; ++j) {
    if (j >= p.ids.n) break;
    const uint32_t d = static_cast<uint32_t>(p.ids.id[j] - v0);
    if (d < N) (j < p.ids.n_suppress ? suppress : zero) |= 1u << d;
  }
  float ch[N], cl[N];
#pragma unroll
  for (int i = 0; i < N; ++i) ch[i] = cl[i] = lv[i];
  if (suppress | zero) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if ((suppress >> i) & 1) ch[i] = -kInf;
      if (((suppress | zero) >> i) & 1) cl[i] = -kInf;
    }
  }

  // x0: argmax of ch + T * g. Noise is drawn only when some id of the chunk could still win:
  // fl(ch + fl(T g)) <= fl(max(ch) + fl(T kGumbelMax)), so a chunk whose bound is <= best
  // cannot replace it (ties go to the lower id, which best already has). Exact, not a heuristic.
  float noisy[N];
#pragma unroll
  for (int i = 0; i < N; ++i) noisy[i] = ch[i];
  if constexpr (kNoise) {
    float ch_max = ch[0];
#pragma unroll
    for (int i = 1; i < N; ++i) ch_max = fmaxf(ch_max, ch[i]);
    if (!(__fadd_rn(ch_max, p.temperature_gumbel_max) <= st.best)) {
      uint64_t even = 0, odd = 0;  // one Philox call feeds ids 2j and 2j + 1
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int v = v0 + i;
        if (i == 0 || (v & 1) == 0) gumbel_bits_pair(seed, r, v >> 1, even, odd);
        const float g = gumbel_from_bits((v & 1) ? odd : even);
        // NaN and +-inf stay: noise cannot move them. A finite value stays below +inf.
        if (fabsf(ch[i]) < kInf)
          noisy[i] = fminf(__fadd_rn(ch[i], __fmul_rn(p.temperature, g)), kFltMax);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < N; ++i) {  // ids ascend within a thread: strict > keeps the lowest
    if (st.best == st.best && !(noisy[i] <= st.best)) {  // larger, or the first NaN
      st.best = noisy[i];
      st.best_id = v0 + i;
      st.best_cl = cl[i];
    }
  }

  if constexpr (kMode != Remasking::Random) {
    float c_max = cl[0];
#pragma unroll
    for (int i = 1; i < N; ++i) c_max = fmaxf(c_max, cl[i]);
    if constexpr (kMode == Remasking::Margin) {  // top two of the multiset {m, m2} + chunk
      float top = st.m;
#pragma unroll
      for (int i = 0; i < N; ++i) {
        st.m2 = fmaxf(st.m2, fminf(top, cl[i]));
        top = fmaxf(top, cl[i]);
      }
    }
    if (c_max > st.m) {  // rescale to the new max
      if (st.s != 0.f) {
        const float d = st.m - c_max, alpha = expf(d);
        if constexpr (kMode == Remasking::Entropy) st.t = alpha * fmaf(d, st.s, st.t);
        st.s *= alpha;
      }
      st.m = c_max;
    }
    if (c_max != -kInf) {  // else every cl is -inf and adds nothing (NaN goes through)
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const float d = cl[i] - st.m, e = expf(d);
        st.s += e;
        if constexpr (kMode == Remasking::Entropy) st.t += e > 0.f ? e * d : 0.f;
      }
    }
  }
}

template <bool kCfg, typename scalar_t>
__device__ __forceinline__ float logit_at(const scalar_t* c, const scalar_t* u, int v,
                                          float s1) {
  const float lc = static_cast<float>(c[v]);
  if constexpr (!kCfg) return lc;
  const float lu = static_cast<float>(u[v]);
  return __fadd_rn(lu, __fmul_rn(s1, __fsub_rn(lc, lu)));  // no FMA: as the eager reference
}

template <typename scalar_t, int N>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[N]) {
  static_assert(N * sizeof(scalar_t) == sizeof(uint4));
  scalar_t vals[N];
  memcpy(vals, &raw, sizeof(uint4));
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<float>(vals[i]);
}

// min blocks 1: no register cap below 255. Without it ptxas aims at 80 registers and spills.
template <typename scalar_t, Remasking kMode, bool kNoise, bool kCfg>
__global__ void __launch_bounds__(kScoreThreads, 1) score_kernel(const ScoreParams<scalar_t> p) {
  constexpr int kVec = sizeof(uint4) / sizeof(scalar_t);  // elements per 16-byte load
  __shared__ RowStats smem[kScoreThreads / kWarpSize];
  const int tid = threadIdx.x;
  const auto combine = [](const RowStats& a, const RowStats& b) { return merge<kMode>(a, b); };

  for (int64_t r = blockIdx.x; r < p.B * p.L; r += gridDim.x) {  // block-uniform loop
    const int64_t b = r / p.L, l = r % p.L;
    const int64_t token = p.x[b * p.x_stride_b + l * p.x_stride_l];
    if (token != p.mask_id || l >= p.block_end[b]) {  // not a candidate: scored if edited
      // Editing is low_confidence's only (the op refuses it with other modes).
      const bool to_edit =
          kMode == Remasking::LowConfidence && p.editing && token != p.mask_id &&
          (!p.editable || p.editable[b * p.editable_stride_b + l * p.editable_stride_l]);
      if (!to_edit) {
        if (tid == 0 && p.key) p.key[r] = kNoCandidate;
        continue;
      }
    }
    const uint64_t seed =
        (kNoise || kMode == Remasking::Random) ? static_cast<uint64_t>(*p.seed) : 0;
    const scalar_t* c = p.logits + b * p.logits_stride_b + l * p.logits_stride_l;
    const scalar_t* u = kCfg ? p.uncond + b * p.uncond_stride_b + l * p.uncond_stride_l : nullptr;
    const float s1 = p.cfg_scale_plus_one;

    // Ids [0, head) one at a time until c is 16-byte aligned, then [head, tail) in 16-byte
    // vectors, then [tail, V) one at a time. With guidance, u must be misaligned alike, or
    // the whole row goes one at a time.
    const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(c) / sizeof(scalar_t) % kVec);
    const bool same = !kCfg || static_cast<int>(reinterpret_cast<uintptr_t>(u) /
                                                sizeof(scalar_t) % kVec) == mis;
    const int head = same ? min(p.V, (kVec - mis) % kVec) : p.V;
    const int n_vec = (p.V - head) / kVec;
    const int tail = head + n_vec * kVec;

    RowStats st = empty_stats();
    for (int v = tid; v < head; v += kScoreThreads) {
      const float lv[1] = {logit_at<kCfg>(c, u, v, s1)};
      absorb<kMode, kNoise>(st, lv, p.vocab_offset + v, p, seed, r);
    }
    const int off = p.vocab_offset;  // ids below are global: column v is id off + v
    const uint4* cv = reinterpret_cast<const uint4*>(c + head);
    const uint4* uv = kCfg ? reinterpret_cast<const uint4*>(u + head) : nullptr;
    for (int i0 = tid; i0 < n_vec; i0 += kScoreThreads * kUnroll<kNoise>) {
      uint4 rc[kUnroll<kNoise>], ru[kCfg ? kUnroll<kNoise> : 1];
#pragma unroll
      for (int k = 0; k < kUnroll<kNoise>; ++k) {  // issue every load before using any
        const int i = i0 + k * kScoreThreads;
        if (i < n_vec) {
          rc[k] = __ldcs(cv + i);  // streamed: each logit is read once
          if constexpr (kCfg) ru[k] = __ldcs(uv + i);
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll<kNoise>; ++k) {
        const int i = i0 + k * kScoreThreads;
        if (i >= n_vec) break;
        float lv[kVec];
        unpack<scalar_t>(rc[k], lv);
        if constexpr (kCfg) {
          float lu[kVec];
          unpack<scalar_t>(ru[k], lu);
#pragma unroll
          for (int e = 0; e < kVec; ++e)
            lv[e] = __fadd_rn(lu[e], __fmul_rn(s1, __fsub_rn(lv[e], lu[e])));
        }
        absorb<kMode, kNoise>(st, lv, off + head + i * kVec, p, seed, r);
      }
    }
    for (int v = tail + tid; v < p.V; v += kScoreThreads) {
      const float lv[1] = {logit_at<kCfg>(c, u, v, s1)};
      absorb<kMode, kNoise>(st, lv, off + v, p, seed, r);
    }

    st = block_reduce<kScoreThreads>(st, combine, empty_stats(), smem);
    if (tid == 0) {
      p.x0[r] = st.best_id == INT32_MAX ? p.ids.first_allowed : st.best_id;  // all -inf
      if (p.stats) {  // the shard's statistics (csrc/ops.cpp, remask_step_stats)
        float* o = p.stats + 4 * r;
        o[0] = st.best;
        o[1] = st.m;
        o[2] = st.s;
        o[3] = kMode == Remasking::LowConfidence ? st.best_cl
               : kMode == Remasking::Margin      ? st.m2
               : kMode == Remasking::Entropy     ? st.t
                                                 : remask_uniform(seed, r);
      } else {
      float conf;
      if constexpr (kMode == Remasking::LowConfidence) {
        conf = expf(st.best_cl - st.m) / st.s;
      } else if constexpr (kMode == Remasking::Margin) {
        conf = 1.f / st.s - expf(st.m2 - st.m) / st.s;
      } else if constexpr (kMode == Remasking::Entropy) {
        conf = st.t / st.s - logf(st.s);
      } else {
        conf = remask_uniform(seed, r);
      }
      conf = conf != conf ? 0.f : conf + 0.f;  // NaN -> 0 (nan_to_num), -0 -> +0
      p.key[r] = selection_key(conf, l);
      if constexpr (kMode == Remasking::LowConfidence) {
        // An editable position: edited or not (common/remask.h). The token is read again
        // rather than kept live through the pass (registers).
        const int64_t tok = p.x[b * p.x_stride_b + l * p.x_stride_l];
        if (tok != p.mask_id)
          p.key[r] = p.x0[r] != tok && conf > p.edit_threshold ? kEdited : kNoCandidate;
      }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: select per row.

struct SelectParams {
  const int64_t* key;  // [B * L]
  const int64_t* x0;   // [B * L]
  const int64_t* x;    // [B, L]
  int64_t x_stride_b, x_stride_l;
  const int64_t* num_transfer;  // [B]
  const int64_t* block_end;     // [B]
  int64_t* x_new;               // [B * L] out
  bool* transfer;               // [B * L] out
  int64_t B, L;
  bool has_threshold;
  int64_t threshold_key;
};

// The k-th largest of keys[0, n) (1 <= k <= the number of keys >= 0; keys unique), built bit
// by bit from the top: the largest t with #{key >= t} >= k. Keys of -1 never count (t >= 1).
__device__ __forceinline__ int64_t kth_largest(const int64_t* keys, int n, int64_t k,
                                               int* smem) {
  int64_t t = 0;
  for (int bit = 62; bit >= 0; --bit) {
    const int64_t trial = t | (int64_t{1} << bit);
    int count = 0;
    for (int i = threadIdx.x; i < n; i += kSelectThreads) count += keys[i] >= trial;
    count = block_reduce<kSelectThreads>(count, [](int a, int b) { return a + b; }, 0, smem);
    if (count >= k) t = trial;
  }
  return t;
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectParams p) {
  __shared__ int64_t s_keys[kSelectCapacity];
  __shared__ int s_count;
  __shared__ int smem[kSelectThreads / kWarpSize];
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {  // block-uniform loop
    const int64_t* keys = p.key + b * p.L;
    const int end = static_cast<int>(min(max(p.block_end[b], int64_t{0}), p.L));
    const int64_t k = max(p.num_transfer[b], int64_t{0});

    // Gather the candidates' keys (in any order: the selection does not depend on it).
    if (threadIdx.x == 0) s_count = 0;
    __syncthreads();
    for (int l = threadIdx.x; l < end; l += kSelectThreads) {
      const int64_t key = keys[l];
      if (key >= 0) {
        const int slot = atomicAdd(&s_count, 1);
        if (slot < kSelectCapacity) s_keys[slot] = key;
      }
    }
    __syncthreads();
    const int count = s_count;

    int64_t bound;  // commit the candidates whose key >= bound (common/remask.h)
    if (k >= count) {
      bound = kNoCandidate;
    } else if (k == 0) {
      bound = kCommitNone;
    } else {  // from shared memory, or if the candidates overflow it from the row itself
      bound = count <= kSelectCapacity ? kth_largest(s_keys, count, k, smem)
                                       : kth_largest(keys, end, k, smem);
    }
    if (p.has_threshold) bound = min(bound, p.threshold_key);

    for (int l = threadIdx.x; l < p.L; l += kSelectThreads) {
      const int64_t key = keys[l];  // -1 past block_end, unless edited (kEdited)
      const bool take = (key >= 0 && key >= bound) || key == kEdited;
      const int64_t r = b * p.L + l;
      p.x_new[r] = take ? p.x0[r] : p.x[b * p.x_stride_b + l * p.x_stride_l];
      p.transfer[r] = take;
    }
    __syncthreads();  // s_count and s_keys are reset for the next row
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

__global__ void gumbel_from_bits_kernel(const int64_t* bits, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = gumbel_from_bits(static_cast<uint64_t>(bits[i]));
}

// Calls f(std::integral_constant<bool, value>).
template <typename F>
void with_bool(bool value, F&& f) {
  if (value) f(std::true_type{});
  else f(std::false_type{});
}

template <typename F>
void with_mode(Remasking mode, F&& f) {
  switch (mode) {
    case Remasking::LowConfidence: return f(std::integral_constant<Remasking, Remasking::LowConfidence>{});
    case Remasking::Random: return f(std::integral_constant<Remasking, Remasking::Random>{});
    case Remasking::Margin: return f(std::integral_constant<Remasking, Remasking::Margin>{});
    case Remasking::Entropy: return f(std::integral_constant<Remasking, Remasking::Entropy>{});
  }
}

template <typename F>
void with_scalar_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "remask_step: logits must be float32, bfloat16 or float16; got ", dtype);
  }
}

// suppress_ids, then the zero_confidence_ids not already suppressed; ids outside the logits'
// [lo, hi) can match no logit and are dropped (the public op rejects ids outside the
// vocabulary before this; a shard's ids belong to other shards).
SpecialIds pack_ids(at::IntArrayRef suppress_ids, at::IntArrayRef zero_confidence_ids,
                    int64_t lo, int64_t hi) {
  std::vector<int32_t> ids;
  const auto add = [&](at::IntArrayRef list) {
    for (const int64_t id : list)
      if (lo <= id && id < hi && std::find(ids.begin(), ids.end(), id) == ids.end())
        ids.push_back(static_cast<int32_t>(id));
  };
  add(suppress_ids);
  const int n_suppress = static_cast<int>(ids.size());
  add(zero_confidence_ids);
  TORCH_CHECK(ids.size() <= kMaxSpecialIds, "remask_step: the CUDA kernel takes at most ",
              kMaxSpecialIds, " distinct suppress_ids and zero_confidence_ids together; got ",
              ids.size());
  SpecialIds out{};
  std::copy(ids.begin(), ids.end(), out.id);
  out.n_suppress = n_suppress;
  out.n = static_cast<int>(ids.size());
  out.first_allowed = static_cast<int>(lo);
  while (std::find(ids.begin(), ids.begin() + n_suppress, out.first_allowed) !=
         ids.begin() + n_suppress)
    ++out.first_allowed;
  if (out.first_allowed >= hi) out.first_allowed = -1;
  return out;
}

// The public op (llada_kernels/ops/remask.py) checks the arguments and hands over contiguous
// [B] int64 num_transfer and block_end; these checks guard direct torch.ops calls against
// reading out of bounds.
void check_inputs(const at::Tensor& logits, const std::optional<at::Tensor>& uncond,
                  const at::Tensor& x, const at::Tensor* num_transfer,
                  const at::Tensor& block_end, const std::optional<at::Tensor>& seed,
                  bool needs_seed) {
  TORCH_CHECK(logits.dim() == 3, "remask_step: logits must be [B, L, V]; got ", logits.sizes());
  const auto device = logits.device();
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK(logits.stride(2) == 1 || V <= 1, "remask_step: logits must have unit stride along V");
  TORCH_CHECK(V >= 1 && V < (int64_t{1} << 31) && L < (int64_t{1} << 31),
              "remask_step: need 1 <= V < 2^31 and L < 2^31; got V=", V, ", L=", L);
  if (uncond) {
    TORCH_CHECK(uncond->sizes() == logits.sizes() && uncond->dtype() == logits.dtype() &&
                    uncond->device() == device && (uncond->stride(2) == 1 || V <= 1),
                "remask_step: uncond_logits must match logits' shape, dtype and device, "
                "with unit stride along V");
  }
  TORCH_CHECK(x.sizes() == at::IntArrayRef({B, L}) && x.scalar_type() == at::kLong &&
                  x.device() == device,
              "remask_step: x must be [B, L] int64 on the logits' device");
  for (const at::Tensor* t : {num_transfer, &block_end}) {
    if (!t) continue;  // remask_step_stats has no num_transfer
    TORCH_CHECK(t->sizes() == at::IntArrayRef({B}) && t->scalar_type() == at::kLong &&
                    t->is_contiguous() && t->device() == device,
                "remask_step: num_transfer and block_end must be contiguous [B] int64 tensors "
                "on the logits' device");
  }
  if (needs_seed) {
    TORCH_CHECK(seed && seed->numel() >= 1 && seed->scalar_type() == at::kLong &&
                    seed->device() == device,
                "remask_step: temperature > 0 and remasking='random' need seed, a [1] int64 "
                "tensor on the logits' device");
  }
}

// Kernel 1 over the candidates: keys and x0, or (stats != nullptr) statistics and x0.
void launch_score(const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits,
                  double cfg_scale, const at::Tensor& x, const at::Tensor& block_end,
                  int64_t mask_id, double temperature, Remasking mode,
                  at::IntArrayRef suppress_ids, at::IntArrayRef zero_confidence_ids,
                  const std::optional<at::Tensor>& seed, int64_t vocab_offset, int64_t* x0,
                  int64_t* key, float* stats,
                  std::optional<double> edit_threshold = std::nullopt,
                  const std::optional<at::Tensor>& editable = std::nullopt) {
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK(vocab_offset >= 0 && vocab_offset + V < (int64_t{1} << 31),
              "remask_step: need 0 <= vocab_offset and vocab_offset + V < 2^31; got ",
              vocab_offset, " and V=", V);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const SpecialIds ids = pack_ids(suppress_ids, zero_confidence_ids, vocab_offset, vocab_offset + V);
  const bool cfg = uncond_logits.has_value(), noise = temperature > 0;
  with_scalar_type(logits.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    ScoreParams<scalar_t> p{};
    p.logits = static_cast<const scalar_t*>(logits.const_data_ptr());
    p.logits_stride_b = logits.stride(0);
    p.logits_stride_l = logits.stride(1);
    if (cfg) {
      p.uncond = static_cast<const scalar_t*>(uncond_logits->const_data_ptr());
      p.uncond_stride_b = uncond_logits->stride(0);
      p.uncond_stride_l = uncond_logits->stride(1);
    }
    p.x = x.const_data_ptr<int64_t>();
    p.x_stride_b = x.stride(0);
    p.x_stride_l = x.stride(1);
    p.block_end = block_end.const_data_ptr<int64_t>();
    p.seed = seed ? seed->const_data_ptr<int64_t>() : nullptr;
    p.x0 = x0;
    p.key = key;
    p.stats = stats;
    p.editing = edit_threshold.has_value();
    p.edit_threshold = p.editing ? static_cast<float>(*edit_threshold) : 0.f;
    if (editable) {
      p.editable = editable->const_data_ptr<bool>();
      p.editable_stride_b = editable->stride(0);
      p.editable_stride_l = editable->stride(1);
    }
    p.B = B;
    p.L = L;
    p.mask_id = mask_id;
    p.V = static_cast<int>(V);
    p.vocab_offset = static_cast<int>(vocab_offset);
    p.cfg_scale_plus_one = static_cast<float>(cfg_scale + 1.0);  // as the reference rounds it
    p.temperature = static_cast<float>(temperature);
    p.temperature_gumbel_max = p.temperature * kGumbelMax;
    p.ids = ids;
    const auto grid = static_cast<unsigned>(std::min<int64_t>(B * L, INT32_MAX));
    with_mode(mode, [&](auto kMode) {
      with_bool(noise, [&](auto kNoise) {
        with_bool(cfg, [&](auto kCfg) {
          score_kernel<scalar_t, kMode.value, kNoise.value, kCfg.value>
              <<<grid, kScoreThreads, 0, stream>>>(p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> remask_step_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits, double cfg_scale,
    const at::Tensor& x, const at::Tensor& num_transfer, const at::Tensor& block_end,
    int64_t mask_id, double temperature, c10::string_view remasking,
    std::optional<double> threshold, at::IntArrayRef suppress_ids,
    at::IntArrayRef zero_confidence_ids, const std::optional<at::Tensor>& seed,
    std::optional<double> edit_threshold, const std::optional<at::Tensor>& editable) {
  const Remasking mode = parse_remasking(remasking);
  check_inputs(logits, uncond_logits, x, &num_transfer, block_end, seed,
               temperature > 0 || mode == Remasking::Random);
  TORCH_CHECK(!edit_threshold || mode == Remasking::LowConfidence,
              "remask_step: edit_threshold needs remasking='low_confidence'; got '", remasking,
              "'");
  if (editable) {
    TORCH_CHECK(editable->scalar_type() == at::kBool && editable->sizes() == x.sizes() &&
                    editable->device() == x.device(),
                "remask_step: editable must be bool [B, L] on the logits' device; got ",
                editable->scalar_type(), " ", editable->sizes());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), L = logits.size(1);
  auto x_new = at::empty({B, L}, x.options());
  auto transfer = at::empty({B, L}, x.options().dtype(at::kBool));
  if (B * L == 0) return {x_new, transfer};
  auto x0 = at::empty({B * L}, x.options());
  auto key = at::empty({B * L}, x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_score(logits, uncond_logits, cfg_scale, x, block_end, mask_id, temperature, mode,
               suppress_ids, zero_confidence_ids, seed, 0, x0.mutable_data_ptr<int64_t>(),
               key.mutable_data_ptr<int64_t>(), nullptr, edit_threshold, editable);

  SelectParams q{};
  q.key = key.const_data_ptr<int64_t>();
  q.x0 = x0.const_data_ptr<int64_t>();
  q.x = x.const_data_ptr<int64_t>();
  q.x_stride_b = x.stride(0);
  q.x_stride_l = x.stride(1);
  q.num_transfer = num_transfer.const_data_ptr<int64_t>();
  q.block_end = block_end.const_data_ptr<int64_t>();
  q.x_new = x_new.mutable_data_ptr<int64_t>();
  q.transfer = transfer.mutable_data_ptr<bool>();
  q.B = B;
  q.L = L;
  // A NaN threshold commits nothing extra (confidence >= NaN is false), whatever its sign bit.
  q.has_threshold = threshold.has_value() && !std::isnan(*threshold);
  q.threshold_key = q.has_threshold ? threshold_key(static_cast<float>(*threshold)) : 0;
  select_kernel<<<static_cast<unsigned>(std::min<int64_t>(B, INT32_MAX)), kSelectThreads, 0,
                  stream>>>(q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_new, transfer};
}

std::tuple<at::Tensor, at::Tensor> remask_step_stats_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& uncond_logits, double cfg_scale,
    const at::Tensor& x, const at::Tensor& block_end, int64_t mask_id, double temperature,
    c10::string_view remasking, at::IntArrayRef suppress_ids,
    at::IntArrayRef zero_confidence_ids, const std::optional<at::Tensor>& seed,
    int64_t vocab_offset) {
  const Remasking mode = parse_remasking(remasking);
  check_inputs(logits, uncond_logits, x, nullptr, block_end, seed,
               temperature > 0 || mode == Remasking::Random);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), L = logits.size(1);
  auto stats = at::zeros({B, L, 4}, logits.options().dtype(at::kFloat));
  auto x0 = at::zeros({B, L}, x.options());
  if (B * L == 0) return {stats, x0};
  launch_score(logits, uncond_logits, cfg_scale, x, block_end, mask_id, temperature, mode,
               suppress_ids, zero_confidence_ids, seed, vocab_offset,
               x0.mutable_data_ptr<int64_t>(), nullptr, stats.mutable_data_ptr<float>());
  return {stats, x0};
}

at::Tensor gumbel_from_bits_cuda(const at::Tensor& bits) {
  TORCH_CHECK(bits.scalar_type() == at::kLong, "gumbel_from_bits: bits must be int64; got ",
              bits.scalar_type());
  const c10::cuda::CUDAGuard guard(bits.device());
  const at::Tensor in = bits.contiguous();
  auto out = at::empty(bits.sizes(), bits.options().dtype(at::kFloat));
  const int64_t n = in.numel();
  if (n == 0) return out;
  constexpr int kThreads = 256;
  const auto grid = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65536));
  gumbel_from_bits_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.const_data_ptr<int64_t>(), out.mutable_data_ptr<float>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace llada::cuda

TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("remask_step", &llada::cuda::remask_step_cuda);
  m.impl("remask_step_stats", &llada::cuda::remask_step_stats_cuda);
  m.impl("gumbel_from_bits", &llada::cuda::gumbel_from_bits_cuda);
}
