// Attention with structured masks on tensor cores: FlashAttention-2 tiling with mma.sync
// m16n8k16 (csrc/cuda/mma.cuh), fp16/bf16 inputs, fp32 accumulation, D in {64, 128}.
// Registered as llada::attention_fwd / attention_bwd (the schema in csrc/ops.cpp).
//
// The mask (ATTN_MASK_SPEC.md): query i sees key j iff qdoc(i) == kdoc(j) and
// lo(j) <= level(i) <= hi(j), from q_mask [B, 2, Lq] = (qdoc, level) and k_mask [B, 3, Lk] =
// (kdoc, lo, hi), int32; no mask: every key. Each (query tile, key tile) pair is classified
// from the tiles' minima and maxima, which every warp computes alike with shuffles, so the
// choice is uniform across the CTA: skip (no load, no product, forward or backward), full (no
// per-element mask) or partial (the per-element rule; a partial tile in which it holds
// nowhere is skipped too, after one __syncthreads_or). Keys past Lk read as (lo, hi) =
// (INT_MAX, -INT_MAX), seen by no level.
//
// Per (batch b, query head h, KV head h / G), in base 2 (t = S log2 e, exp becomes exp2):
//   S = scale Q K^T where visible, -inf elsewhere.
// forward   one CTA of 4 warps per 64 queries, each warp owning 16 query rows, walks the key
//           tiles of 64 with an online softmax; P stays in registers between S = Q K^T and
//           O += P V. A row that has seen no key yet uses 0 in place of its running max.
//           O = acc / l, lse = (m + log2 l) ln 2, and a row with no key gets O = 0, lse = +inf.
// backward  recomputes P = exp(S - lse) from the forward's lse, delta_i = sum_d dO_id O_id:
//           dkdv: one CTA per 64 keys (16 per warp) accumulates dV = P^T dO and
//                 dK = scale dS^T Q over the G query heads of its group and all queries;
//           dq:   one CTA per 64 queries accumulates dQ = scale dS K over the key tiles;
//           dS = P * (dP - delta), dP = dO V^T. No atomics: the result is deterministic.
// Tiles are staged in shared memory with a row stride of D + 8 elements, which makes the
// 32-bit fragment loads bank-conflict free.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <array>
#include <cmath>

#include "cuda/mma.cuh"

namespace llada {
namespace {

using mma::Lane;

constexpr int kThreads = 128;  // 4 warps
constexpr int kTile = 64;      // queries per CTA (forward, dq), keys per CTA (dkdv) and per step
constexpr int kBwdStep = 32;   // queries per step of the dkdv kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kIntMax = 2147483647;
constexpr int kIntMin = -2147483647;  // -INT_MAX: a max that comes out too large is harmless

template <int D>
constexpr int ld() { return D + 8; }  // shared-memory row stride, elements

// A [B, H, L, D] tensor seen by one (b, h): base pointer and row stride. D has unit stride.
template <typename T>
struct Slab {
  const T* p;
  int64_t sl;
};

struct Params {
  const void *q, *k, *v, *dout, *out;
  const int *qm, *km;            // [B, 2, Lq] and [B, 3, Lk], or both null (no mask)
  void *o, *dq, *dk, *dv;        // outputs, contiguous
  float *lse, *delta;            // [B, Hq, Lq]
  const float* dlse;             // [B, Hq, Lq], the gradient of lse, or null (zero)
  int64_t q_s[3], k_s[3], v_s[3], dout_s[3], out_s[3];  // strides of B, H, L
  int Hq, Hkv, G, Lq, Lk;
  float scale, scale_log2;
};

template <typename T>
__device__ __forceinline__ Slab<T> slab(const void* base, const int64_t* s, int64_t b, int64_t h) {
  return {static_cast<const T*>(base) + b * s[0] + h * s[1], s[2]};
}

// Rows [r0, r0 + kRows) of a slab into shared memory; rows at or past L read as zero.
template <typename T, int D, int kRows>
__device__ __forceinline__ void load_tile(T* s, Slab<T> g, int r0, int L) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r0 + r < L) v = *reinterpret_cast<const uint4*>(g.p + (r0 + r) * g.sl + c);
    *reinterpret_cast<uint4*>(s + r * ld<D>() + c) = v;
  }
}

// ---- the mask -----------------------------------------------------------------------------

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

struct Span {  // the minimum and maximum of one mask field over a tile
  int lo, hi;
};

// The span of (lo, hi) over the warp; every lane gets it.
__device__ __forceinline__ Span warp_span(int lo, int hi) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    lo = imin(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = imax(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
  return {lo, hi};
}

// One query or key of a tile, as the kernels read it.
struct QMask {
  int doc, level;
};
struct KMask {
  int doc, lo, hi;
};

// Query i of a batch row's q_mask ([2, Lq]); rows past Lq are never used.
__device__ __forceinline__ QMask q_at(const int* qm, int i, int Lq) {
  if (qm == nullptr || i >= Lq) return {0, 0};
  return {qm[i], qm[Lq + i]};
}

// Key j of a batch row's k_mask ([3, Lk]); past Lk a key that no level sees.
__device__ __forceinline__ KMask k_at(const int* km, int j, int Lk) {
  if (j >= Lk) return {0, kIntMax, kIntMin};
  if (km == nullptr) return {0, 0, kIntMax};
  return {km[j], km[Lk + j], km[2 * Lk + j]};
}

// Field by field into shared memory (plain scalar stores, as the host emulation models them).
__device__ __forceinline__ void put(QMask* dst, QMask q) { dst->doc = q.doc, dst->level = q.level; }
__device__ __forceinline__ void put(KMask* dst, KMask k) {
  dst->doc = k.doc, dst->lo = k.lo, dst->hi = k.hi;
}

__device__ __forceinline__ bool sees(QMask q, KMask k) {
  return q.doc == k.doc && k.lo <= q.level && q.level <= k.hi;
}

struct QTile {
  Span doc, level;
};
struct KTile {
  Span doc, lo, hi;
};

// The spans of queries [m0, m0 + kRows), kRows a multiple of 32: lane reads m0 + lane + 32 r.
template <int kRows>
__device__ __forceinline__ QTile q_tile(const int* qm, int m0, int Lq, int lane) {
  int dlo = kIntMax, dhi = kIntMin, llo = kIntMax, lhi = kIntMin;
#pragma unroll
  for (int r = 0; r < kRows / 32; ++r) {
    const int i = m0 + lane + 32 * r;
    if (i < Lq) {
      const QMask q = q_at(qm, i, Lq);
      dlo = imin(dlo, q.doc), dhi = imax(dhi, q.doc);
      llo = imin(llo, q.level), lhi = imax(lhi, q.level);
    }
  }
  return {warp_span(dlo, dhi), warp_span(llo, lhi)};
}

// The spans of keys [n0, n0 + kTile): lane reads n0 + lane and n0 + lane + 32.
__device__ __forceinline__ KTile k_tile(const int* km, int n0, int Lk, int lane) {
  int dlo = kIntMax, dhi = kIntMin, alo = kIntMax, ahi = kIntMin, blo = kIntMax, bhi = kIntMin;
#pragma unroll
  for (int r = 0; r < kTile / 32; ++r) {
    const int j = n0 + lane + 32 * r;
    const KMask k = k_at(km, j, Lk);
    if (j < Lk) dlo = imin(dlo, k.doc), dhi = imax(dhi, k.doc);
    alo = imin(alo, k.lo), ahi = imax(ahi, k.lo);
    blo = imin(blo, k.hi), bhi = imax(bhi, k.hi);
  }
  return {warp_span(dlo, dhi), warp_span(alo, ahi), warp_span(blo, bhi)};
}

enum class Tile { kSkip, kFull, kPartial };

__device__ __forceinline__ Tile classify(const QTile& q, const KTile& k) {
  if (q.doc.hi < k.doc.lo || k.doc.hi < q.doc.lo || q.level.hi < k.lo.lo || q.level.lo > k.hi.hi)
    return Tile::kSkip;
  const bool one_doc = q.doc.lo == q.doc.hi && k.doc.lo == k.doc.hi && q.doc.lo == k.doc.lo;
  return one_doc && k.lo.hi <= q.level.lo && q.level.hi <= k.hi.lo ? Tile::kFull : Tile::kPartial;
}

// The class of the pair (query tile at m0 of kRows, key tile at n0), the same in every thread.
template <int kRows>
__device__ __forceinline__ Tile tile_class(const Params& p, const int* qm, const int* km, int m0,
                                           int n0, int lane) {
  if (p.qm == nullptr) return n0 + kTile <= p.Lk ? Tile::kFull : Tile::kPartial;
  return classify(q_tile<kRows>(qm, m0, p.Lq, lane), k_tile(km, n0, p.Lk, lane));
}

// Store the rows g and g + 8 of a warp's [16 x D] fp32 fragments, times `mul[r]`.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* dst, int row0, int L, const float (&acc)[D / 8][4],
                                           const float mul[2], Lane l) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + l.g + 8 * r;
    if (row >= L) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + int64_t(row) * D + dt * 8 + 2 * l.q) =
          mma::pack<T>(acc[dt][2 * r] * mul[r], acc[dt][2 * r + 1] * mul[r]);
    }
  }
}

// ---- forward -----------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);  // [kTile][ld]
  T* Ks = Qs + kTile * ld<D>();
  T* Vs = Ks + kTile * ld<D>();
  KMask* kmask = reinterpret_cast<KMask*>(Vs + kTile * ld<D>());  // [kTile]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Lane ln(lane);
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq, hk = h / p.G;
  const int m0 = blockIdx.y * kTile, row0 = m0 + warp * 16;
  const int* qm = p.qm ? p.qm + b * 2 * p.Lq : nullptr;
  const int* km = p.km ? p.km + b * 3 * p.Lk : nullptr;
  const Slab<T> k = slab<T>(p.k, p.k_s, b, hk), v = slab<T>(p.v, p.v_s, b, hk);
  load_tile<T, D, kTile>(Qs, slab<T>(p.q, p.q_s, b, h), m0, p.Lq);
  const T* Qw = Qs + warp * 16 * ld<D>();
  const QMask qrow[2] = {q_at(qm, row0 + ln.g, p.Lq), q_at(qm, row0 + ln.g + 8, p.Lq)};

  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g, g + 8 (l: this lane's part)
  for (int n0 = 0; n0 < p.Lk; n0 += kTile) {
    const Tile cls = tile_class<kTile>(p, qm, km, m0, n0, lane);
    if (cls == Tile::kSkip) continue;  // uniform: every thread computed the same class
    __syncthreads();                   // the previous tile's readers are done
    if (threadIdx.x < kTile) put(kmask + threadIdx.x, k_at(km, n0 + threadIdx.x, p.Lk));
    if (cls == Tile::kPartial) {
      __syncthreads();
      bool any = false;
#pragma unroll
      for (int c = 0; c < kTile / 4; ++c) {  // this lane's 2 rows x 16 columns
        const KMask kc = kmask[(c / 2) * 8 + 2 * ln.q + (c & 1)];
        any |= sees(qrow[0], kc) | sees(qrow[1], kc);
      }
      if (!__syncthreads_or(any)) continue;
    }
    load_tile<T, D, kTile>(Ks, k, n0, p.Lk);
    load_tile<T, D, kTile>(Vs, v, n0, p.Lk);
    __syncthreads();

    float s[kTile / 8][4] = {};  // this warp's 16 x 64 scores
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      mma::load_a(a, Qw + kk * 16, ld<D>(), ln);
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt) {
        uint32_t bf[2];
        mma::load_b_nmajor(bf, Ks + nt * 8 * ld<D>() + kk * 16, ld<D>(), ln);
        mma::mma_16816<T>(s[nt], a, bf);
      }
    }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] *= p.scale_log2;
        if (cls == Tile::kPartial && !sees(qrow[i >> 1], kmask[nt * 8 + 2 * ln.q + (i & 1)]))
          s[nt][i] = -INFINITY;
        mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
      }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = mma::quad_max(mx[r]);
      base[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row that has seen no key yet
      alpha[r] = exp2f(m[r] - base[r]);
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0], o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1], o[dt][3] *= alpha[1];
    }
    uint32_t pa[kTile / 16][4];  // P as A fragments
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      float e[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        e[i] = exp2f(s[nt][i] - base[i >> 1]);
        l[i >> 1] += e[i];
      }
      pa[nt / 2][(nt % 2) * 2] = mma::pack<T>(e[0], e[1]);
      pa[nt / 2][(nt % 2) * 2 + 1] = mma::pack<T>(e[2], e[3]);
    }
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j)
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t bf[2];
        mma::load_b_kmajor(bf, Vs + j * 16 * ld<D>() + dt * 8, ld<D>(), ln);
        mma::mma_16816<T>(o[dt], pa[j], bf);
      }
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = mma::quad_sum(l[r]);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
    const int row = row0 + ln.g + 8 * r;
    if (ln.q == 0 && row < p.Lq)
      p.lse[bh * p.Lq + row] = l[r] > 0.f ? (m[r] + log2f(l[r])) * kLn2 : INFINITY;
  }
  store_rows<T, D>(static_cast<T*>(p.o) + bh * p.Lq * D, row0, p.Lq, o, inv, ln);
}

// ---- backward ----------------------------------------------------------------------------

// delta[b, h, i] = sum_d dO[b, h, i, d] O[b, h, i, d] - dlse[b, h, i]: one warp per row. (The
// lse gradient: d lse_i / d s_ij = p_ij, so dS = P (dP - delta) takes it through delta.) A 1-D
// grid of B Hq ceil(Lq / 4) CTAs (grid.x reaches 2^31 - 1; grid.y would stop at 65535).
constexpr int kDeltaRows = kThreads / 32;
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const Params p, int D) {
  const int64_t row_blocks = (p.Lq + kDeltaRows - 1) / kDeltaRows;
  const int64_t bh = blockIdx.x / row_blocks, b = bh / p.Hq, h = bh % p.Hq;
  const int i = static_cast<int>(blockIdx.x % row_blocks) * kDeltaRows + threadIdx.x / 32;
  if (i >= p.Lq) return;
  const Slab<T> dout = slab<T>(p.dout, p.dout_s, b, h), out = slab<T>(p.out, p.out_s, b, h);
  float acc = 0.f;
  for (int d = threadIdx.x % 32; d < D; d += 32)
    acc += mma::to_float(dout.p[i * dout.sl + d]) * mma::to_float(out.p[i * out.sl + d]);
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  const float dlse = p.dlse ? p.dlse[bh * p.Lq + i] : 0.f;
  if (threadIdx.x % 32 == 0) p.delta[bh * p.Lq + i] = acc - dlse;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dkdv_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);  // [kTile][ld]
  T* Vs = Ks + kTile * ld<D>();
  T* Qs = Vs + kTile * ld<D>();        // [kBwdStep][ld]
  T* dOs = Qs + kBwdStep * ld<D>();
  float* lse2 = reinterpret_cast<float*>(dOs + kBwdStep * ld<D>());  // [kBwdStep], base 2
  float* delta = lse2 + kBwdStep;
  QMask* qmask = reinterpret_cast<QMask*>(delta + kBwdStep);        // [kBwdStep]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Lane ln(lane);
  const int64_t bhk = blockIdx.x, b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int n0 = blockIdx.y * kTile, row0 = n0 + warp * 16;
  const int* qm = p.qm ? p.qm + b * 2 * p.Lq : nullptr;
  const int* km = p.km ? p.km + b * 3 * p.Lk : nullptr;
  // This lane's keys: rows g and g + 8 of the warp's 16.
  const KMask krow[2] = {k_at(km, row0 + ln.g, p.Lk), k_at(km, row0 + ln.g + 8, p.Lk)};
  const KTile keys = k_tile(km, n0, p.Lk, lane);

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  bool loaded = false;  // K and V of this tile are in shared memory
  const T* Kw = Ks + warp * 16 * ld<D>();
  const T* Vw = Vs + warp * 16 * ld<D>();
  for (int64_t h = hk * p.G; h < (hk + 1) * p.G; ++h) {
    const int64_t row_base = (b * p.Hq + h) * p.Lq;
    for (int m0 = 0; m0 < p.Lq; m0 += kBwdStep) {
      // No mask: every pair is seen (keys past Lk are not stored, queries past Lq have P = 0).
      const Tile cls = p.qm == nullptr ? Tile::kFull
                                       : classify(q_tile<kBwdStep>(qm, m0, p.Lq, lane), keys);
      if (cls == Tile::kSkip) continue;  // uniform: every thread computed the same class
      __syncthreads();                   // the previous step's readers are done
      if (threadIdx.x < kBwdStep) put(qmask + threadIdx.x, q_at(qm, m0 + threadIdx.x, p.Lq));
      if (cls == Tile::kPartial) {
        __syncthreads();
        bool any = false;
#pragma unroll
        for (int c = 0; c < kBwdStep / 4; ++c) {  // this lane's 2 keys x 8 queries
          const QMask qc = qmask[(c / 2) * 8 + 2 * ln.q + (c & 1)];
          any |= sees(qc, krow[0]) | sees(qc, krow[1]);
        }
        if (!__syncthreads_or(any)) continue;
      }
      if (!loaded) {
        load_tile<T, D, kTile>(Ks, slab<T>(p.k, p.k_s, b, hk), n0, p.Lk);
        load_tile<T, D, kTile>(Vs, slab<T>(p.v, p.v_s, b, hk), n0, p.Lk);
        loaded = true;
      }
      load_tile<T, D, kBwdStep>(Qs, slab<T>(p.q, p.q_s, b, h), m0, p.Lq);
      load_tile<T, D, kBwdStep>(dOs, slab<T>(p.dout, p.dout_s, b, h), m0, p.Lq);
      if (threadIdx.x < kBwdStep) {  // query rows past Lq: lse = +inf, so P = 0
        const int row = m0 + threadIdx.x;
        lse2[threadIdx.x] = row < p.Lq ? p.lse[row_base + row] * kLog2e : INFINITY;
        delta[threadIdx.x] = row < p.Lq ? p.delta[row_base + row] : 0.f;
      }
      __syncthreads();

      float st[kBwdStep / 8][4] = {}, dpt[kBwdStep / 8][4] = {};  // S^T, dP^T: 16 keys x 32
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ak[4], av[4];
        mma::load_a(ak, Kw + kk * 16, ld<D>(), ln);
        mma::load_a(av, Vw + kk * 16, ld<D>(), ln);
#pragma unroll
        for (int nt = 0; nt < kBwdStep / 8; ++nt) {
          uint32_t bq[2], bo[2];
          mma::load_b_nmajor(bq, Qs + nt * 8 * ld<D>() + kk * 16, ld<D>(), ln);
          mma::load_b_nmajor(bo, dOs + nt * 8 * ld<D>() + kk * 16, ld<D>(), ln);
          mma::mma_16816<T>(st[nt], ak, bq);
          mma::mma_16816<T>(dpt[nt], av, bo);
        }
      }
      uint32_t pa[kBwdStep / 16][4], dsa[kBwdStep / 16][4];
#pragma unroll
      for (int nt = 0; nt < kBwdStep / 8; ++nt) {
        float e[4], ds[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = nt * 8 + 2 * ln.q + (i & 1);
          const bool on = cls == Tile::kFull || sees(qmask[col], krow[i >> 1]);
          e[i] = on ? exp2f(st[nt][i] * p.scale_log2 - lse2[col]) : 0.f;
          ds[i] = e[i] * (dpt[nt][i] - delta[col]);
        }
        pa[nt / 2][(nt % 2) * 2] = mma::pack<T>(e[0], e[1]);
        pa[nt / 2][(nt % 2) * 2 + 1] = mma::pack<T>(e[2], e[3]);
        dsa[nt / 2][(nt % 2) * 2] = mma::pack<T>(ds[0], ds[1]);
        dsa[nt / 2][(nt % 2) * 2 + 1] = mma::pack<T>(ds[2], ds[3]);
      }
#pragma unroll
      for (int j = 0; j < kBwdStep / 16; ++j)
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          uint32_t bo[2], bq[2];
          mma::load_b_kmajor(bo, dOs + j * 16 * ld<D>() + dt * 8, ld<D>(), ln);
          mma::load_b_kmajor(bq, Qs + j * 16 * ld<D>() + dt * 8, ld<D>(), ln);
          mma::mma_16816<T>(dv[dt], pa[j], bo);
          mma::mma_16816<T>(dk[dt], dsa[j], bq);
        }
    }
  }
  // Keys that no query sees (padding, or skipped tiles) keep dK = dV = 0.
  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  store_rows<T, D>(static_cast<T*>(p.dk) + bhk * p.Lk * D, row0, p.Lk, dk, scale, ln);
  store_rows<T, D>(static_cast<T*>(p.dv) + bhk * p.Lk * D, row0, p.Lk, dv, one, ln);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_dq_kernel(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);  // [kTile][ld] each
  T* dOs = Qs + kTile * ld<D>();
  T* Ks = dOs + kTile * ld<D>();
  T* Vs = Ks + kTile * ld<D>();
  KMask* kmask = reinterpret_cast<KMask*>(Vs + kTile * ld<D>());  // [kTile]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Lane ln(lane);
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq, hk = h / p.G;
  const int m0 = blockIdx.y * kTile, row0 = m0 + warp * 16;
  const int* qm = p.qm ? p.qm + b * 2 * p.Lq : nullptr;
  const int* km = p.km ? p.km + b * 3 * p.Lk : nullptr;
  const Slab<T> k = slab<T>(p.k, p.k_s, b, hk), v = slab<T>(p.v, p.v_s, b, hk);
  load_tile<T, D, kTile>(Qs, slab<T>(p.q, p.q_s, b, h), m0, p.Lq);
  load_tile<T, D, kTile>(dOs, slab<T>(p.dout, p.dout_s, b, h), m0, p.Lq);
  const T* Qw = Qs + warp * 16 * ld<D>();
  const T* dOw = dOs + warp * 16 * ld<D>();
  const QMask qrow[2] = {q_at(qm, row0 + ln.g, p.Lq), q_at(qm, row0 + ln.g + 8, p.Lq)};
  float lse2[2], delta[2];  // rows g and g + 8; rows past Lq get P = 0
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + ln.g + 8 * r;
    lse2[r] = row < p.Lq ? p.lse[bh * p.Lq + row] * kLog2e : INFINITY;
    delta[r] = row < p.Lq ? p.delta[bh * p.Lq + row] : 0.f;
  }

  float dq[D / 8][4] = {};
  for (int n0 = 0; n0 < p.Lk; n0 += kTile) {
    const Tile cls = tile_class<kTile>(p, qm, km, m0, n0, lane);
    if (cls == Tile::kSkip) continue;  // uniform: every thread computed the same class
    __syncthreads();                   // the previous tile's readers are done
    if (threadIdx.x < kTile) put(kmask + threadIdx.x, k_at(km, n0 + threadIdx.x, p.Lk));
    if (cls == Tile::kPartial) {
      __syncthreads();
      bool any = false;
#pragma unroll
      for (int c = 0; c < kTile / 4; ++c) {  // this lane's 2 rows x 16 columns
        const KMask kc = kmask[(c / 2) * 8 + 2 * ln.q + (c & 1)];
        any |= sees(qrow[0], kc) | sees(qrow[1], kc);
      }
      if (!__syncthreads_or(any)) continue;
    }
    load_tile<T, D, kTile>(Ks, k, n0, p.Lk);
    load_tile<T, D, kTile>(Vs, v, n0, p.Lk);
    __syncthreads();

    float s[kTile / 8][4] = {}, dp[kTile / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[4], ao[4];
      mma::load_a(aq, Qw + kk * 16, ld<D>(), ln);
      mma::load_a(ao, dOw + kk * 16, ld<D>(), ln);
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt) {
        uint32_t bk[2], bv[2];
        mma::load_b_nmajor(bk, Ks + nt * 8 * ld<D>() + kk * 16, ld<D>(), ln);
        mma::load_b_nmajor(bv, Vs + nt * 8 * ld<D>() + kk * 16, ld<D>(), ln);
        mma::mma_16816<T>(s[nt], aq, bk);
        mma::mma_16816<T>(dp[nt], ao, bv);
      }
    }
    uint32_t dsa[kTile / 16][4];
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      float ds[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool on = cls == Tile::kFull ||
                        sees(qrow[i >> 1], kmask[nt * 8 + 2 * ln.q + (i & 1)]);
        const float e = on ? exp2f(s[nt][i] * p.scale_log2 - lse2[i >> 1]) : 0.f;
        ds[i] = e * (dp[nt][i] - delta[i >> 1]);
      }
      dsa[nt / 2][(nt % 2) * 2] = mma::pack<T>(ds[0], ds[1]);
      dsa[nt / 2][(nt % 2) * 2 + 1] = mma::pack<T>(ds[2], ds[3]);
    }
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j)
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        uint32_t bk[2];
        mma::load_b_kmajor(bk, Ks + j * 16 * ld<D>() + dt * 8, ld<D>(), ln);
        mma::mma_16816<T>(dq[dt], dsa[j], bk);
      }
  }
  const float scale[2] = {p.scale, p.scale};
  store_rows<T, D>(static_cast<T*>(p.dq) + bh * p.Lq * D, row0, p.Lq, dq, scale, ln);
}

// ---- host side ---------------------------------------------------------------------------

// fp16/bf16 and D in {64, 128}: the four instantiations of every kernel.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t D, F&& f) {
  const bool half = dtype == at::kHalf;
  if (D == 64) {
    half ? f.template operator()<__half, 64>() : f.template operator()<__nv_bfloat16, 64>();
  } else {
    half ? f.template operator()<__half, 128>() : f.template operator()<__nv_bfloat16, 128>();
  }
}

// The kernels read 16-byte chunks: a tensor whose rows are not 16-byte aligned is copied
// (clone, not contiguous(): a contiguous view at an odd offset must be copied too).
at::Tensor aligned(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

void set_strides(int64_t (&s)[3], const at::Tensor& t) {
  s[0] = t.stride(0), s[1] = t.stride(1), s[2] = t.stride(2);
}

using OptTensor = std::optional<at::Tensor>;

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const OptTensor& q_mask, const OptTensor& k_mask) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device() && t->dim() == 4 &&
                    t->scalar_type() == q.scalar_type(),
                "attention (cuda): q, k, v must be 4-d tensors of one dtype on one CUDA device");
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention (cuda): dtype must be float16 or bfloat16");
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128,
              "attention (cuda): D must be 64 or 128; got ", q.size(3));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "attention (cuda): Hq must be a multiple of Hkv");
  // One CTA per 64 rows along grid.y (at most 65535), one per (batch, head) along grid.x.
  constexpr int64_t kMaxLen = 65535 * kTile;
  TORCH_CHECK(q.size(2) <= kMaxLen && k.size(2) <= kMaxLen,
              "attention (cuda): Lq and Lk must be <= ", kMaxLen, " (65535 tiles of ", kTile,
              "); got Lq = ", q.size(2), ", Lk = ", k.size(2));
  TORCH_CHECK(q.size(0) * q.size(1) * ((q.size(2) + kDeltaRows - 1) / kDeltaRows) < (1LL << 31),
              "attention (cuda): B * Hq * ceil(Lq / ", kDeltaRows, ") must be < 2^31; got B = ",
              q.size(0), ", Hq = ", q.size(1), ", Lq = ", q.size(2));
  TORCH_CHECK(q_mask.has_value() == k_mask.has_value(),
              "attention (cuda): q_mask and k_mask must both be given or both be None");
  if (q_mask) {
    const std::array<int64_t, 3> qs = {q.size(0), 2, q.size(2)}, ks = {q.size(0), 3, k.size(2)};
    TORCH_CHECK(q_mask->device() == q.device() && q_mask->scalar_type() == at::kInt &&
                    q_mask->is_contiguous() && q_mask->sizes() == at::IntArrayRef(qs),
                "attention (cuda): q_mask must be contiguous int32 [B, 2, Lq] on q's device");
    TORCH_CHECK(k_mask->device() == q.device() && k_mask->scalar_type() == at::kInt &&
                    k_mask->is_contiguous() && k_mask->sizes() == at::IntArrayRef(ks),
                "attention (cuda): k_mask must be contiguous int32 [B, 3, Lk] on q's device");
  }
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const OptTensor& q_mask, const OptTensor& k_mask, double scale) {
  Params p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.qm = q_mask ? q_mask->data_ptr<int>() : nullptr;
  p.km = k_mask ? k_mask->data_ptr<int>() : nullptr;
  set_strides(p.q_s, q), set_strides(p.k_s, k), set_strides(p.v_s, v);
  p.Hq = q.size(1), p.Hkv = k.size(1), p.G = q.size(1) / k.size(1);
  p.Lq = q.size(2), p.Lk = k.size(2);
  p.scale = static_cast<float>(scale), p.scale_log2 = static_cast<float>(scale) * kLog2e;
  return p;
}

template <typename Kernel>
void launch(Kernel kernel, dim3 grid, size_t smem, const Params& p, cudaStream_t stream) {
  if (grid.x == 0 || grid.y == 0) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned tiles(int64_t L, int64_t tile) { return static_cast<unsigned>((L + tile - 1) / tile); }

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const OptTensor& q_mask,
    const OptTensor& k_mask, double scale) {
  check_inputs(q_, k_, v_, q_mask, k_mask);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = aligned(q_), k = aligned(k_), v = aligned(v_);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  Params p = make_params(q, k, v, q_mask, k_mask, scale);
  p.o = out.data_ptr(), p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(B * Hq), tiles(Lq, kTile));
  dispatch(q.scalar_type(), D, [&]<typename T, int kD>() {
    const size_t smem = 3 * kTile * ld<kD>() * sizeof(T) + kTile * sizeof(KMask);
    launch(attention_fwd_kernel<T, kD>, grid, smem, p, stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const OptTensor& q_mask, const OptTensor& k_mask, const at::Tensor& out,
    const at::Tensor& lse_, double scale, const OptTensor& grad_lse_) {
  check_inputs(q_, k_, v_, q_mask, k_mask);
  TORCH_CHECK(grad_out.device() == q_.device() && out.device() == q_.device() &&
                  grad_out.scalar_type() == q_.scalar_type() &&
                  out.scalar_type() == q_.scalar_type() && lse_.scalar_type() == at::kFloat,
              "attention (cuda): grad_out and out must match q; lse must be fp32");
  TORCH_CHECK(!grad_lse_ || (grad_lse_->device() == q_.device() &&
                             grad_lse_->scalar_type() == at::kFloat &&
                             grad_lse_->sizes() == lse_.sizes()),
              "attention (cuda): grad_lse must be None or fp32 like lse");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = aligned(q_), k = aligned(k_), v = aligned(v_), dout = aligned(grad_out);
  const at::Tensor lse = lse_.contiguous();
  const at::Tensor grad_lse = grad_lse_ ? grad_lse_->contiguous() : at::Tensor();
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), Lq = q.size(2), Lk = k.size(2);
  const int64_t D = q.size(3);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({B, Hq, Lq}, lse.options());
  Params p = make_params(q, k, v, q_mask, k_mask, scale);
  p.dout = dout.data_ptr(), p.out = out.data_ptr();
  set_strides(p.dout_s, dout), set_strides(p.out_s, out);
  p.lse = const_cast<float*>(lse.data_ptr<float>()), p.delta = delta.data_ptr<float>();
  p.dlse = grad_lse.defined() ? grad_lse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), D, [&]<typename T, int kD>() {
    const dim3 rows(static_cast<unsigned>(B * Hq) * tiles(Lq, kDeltaRows));
    if (rows.x > 0) {
      attention_delta_kernel<T><<<rows, kThreads, 0, stream>>>(p, kD);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const size_t dkdv_smem = (2 * kTile + 2 * kBwdStep) * ld<kD>() * sizeof(T) +
                             2 * kBwdStep * sizeof(float) + kBwdStep * sizeof(QMask);
    launch(attention_dkdv_kernel<T, kD>, dim3(static_cast<unsigned>(B * Hkv), tiles(Lk, kTile)),
           dkdv_smem, p, stream);
    const size_t dq_smem = 4 * kTile * ld<kD>() * sizeof(T) + kTile * sizeof(KMask);
    launch(attention_dq_kernel<T, kD>, dim3(static_cast<unsigned>(B * Hq), tiles(Lq, kTile)),
           dq_smem, p, stream);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace llada
