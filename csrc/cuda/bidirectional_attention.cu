// Bidirectional attention on tensor cores: FlashAttention-2 tiling with mma.sync m16n8k16
// (csrc/cuda/mma.cuh), fp16/bf16 inputs, fp32 accumulation, D in {64, 128}.
//
// Per (batch b, query head h, KV head h / G), in base 2 (t = S log2 e, exp becomes exp2):
//   S = scale Q K^T + bias,  bias_j = 0 for an attended key, -inf for a padded one.
// forward   one CTA of 4 warps per 64 queries, each warp owning 16 query rows, walks the key
//           tiles of 64 with an online softmax; P stays in registers between S = Q K^T and
//           O += P V. Key tiles that are all padding are skipped (__syncthreads_or).
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
  const bool* mask;              // [B, Lk] or null
  void *o, *dq, *dk, *dv;        // outputs, contiguous
  float *lse, *delta;            // [B, Hq, Lq]
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

__device__ __forceinline__ bool key_on(const bool* mask, int j, int Lk) {
  return j < Lk && (mask == nullptr || mask[j]);
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
  float* bias = reinterpret_cast<float*>(Vs + kTile * ld<D>());  // [kTile]

  const int warp = threadIdx.x / 32;
  const Lane ln(threadIdx.x % 32);
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq, hk = h / p.G;
  const int m0 = blockIdx.y * kTile;
  const bool* mask = p.mask ? p.mask + b * p.Lk : nullptr;
  const Slab<T> k = slab<T>(p.k, p.k_s, b, hk), v = slab<T>(p.v, p.v_s, b, hk);
  load_tile<T, D, kTile>(Qs, slab<T>(p.q, p.q_s, b, h), m0, p.Lq);
  const T* Qw = Qs + warp * 16 * ld<D>();

  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g, g + 8 (l: this lane's part)
  for (int n0 = 0; n0 < p.Lk; n0 += kTile) {
    const bool on = threadIdx.x < kTile && key_on(mask, n0 + threadIdx.x, p.Lk);
    if (!__syncthreads_or(on)) continue;  // every key padded; also: the last tile is consumed
    if (threadIdx.x < kTile) bias[threadIdx.x] = on ? 0.f : -INFINITY;
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
        s[nt][i] = s[nt][i] * p.scale_log2 + bias[nt * 8 + 2 * ln.q + (i & 1)];
        mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = mma::quad_max(mx[r]);  // finite: the tile has a key
      alpha[r] = exp2f(m[r] - mx[r]);
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
        e[i] = exp2f(s[nt][i] - m[i >> 1]);
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
  const int row0 = m0 + warp * 16;
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

// delta[b, h, i] = sum_d dO[b, h, i, d] O[b, h, i, d]: one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const Params p, int D) {
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq;
  const int i = blockIdx.y * (kThreads / 32) + threadIdx.x / 32;
  if (i >= p.Lq) return;
  const Slab<T> dout = slab<T>(p.dout, p.dout_s, b, h), out = slab<T>(p.out, p.out_s, b, h);
  float acc = 0.f;
  for (int d = threadIdx.x % 32; d < D; d += 32)
    acc += mma::to_float(dout.p[i * dout.sl + d]) * mma::to_float(out.p[i * out.sl + d]);
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x % 32 == 0) p.delta[bh * p.Lq + i] = acc;
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

  const int warp = threadIdx.x / 32;
  const Lane ln(threadIdx.x % 32);
  const int64_t bhk = blockIdx.x, b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const int n0 = blockIdx.y * kTile;
  const bool* mask = p.mask ? p.mask + b * p.Lk : nullptr;
  // This lane's keys: rows g and g + 8 of the warp's 16.
  const bool keep[2] = {key_on(mask, n0 + warp * 16 + ln.g, p.Lk),
                        key_on(mask, n0 + warp * 16 + ln.g + 8, p.Lk)};

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  const bool any = __syncthreads_or(threadIdx.x < kTile && key_on(mask, n0 + threadIdx.x, p.Lk));
  if (any) {  // a tile of padded keys has dK = dV = 0
    load_tile<T, D, kTile>(Ks, slab<T>(p.k, p.k_s, b, hk), n0, p.Lk);
    load_tile<T, D, kTile>(Vs, slab<T>(p.v, p.v_s, b, hk), n0, p.Lk);
    const T* Kw = Ks + warp * 16 * ld<D>();
    const T* Vw = Vs + warp * 16 * ld<D>();
    for (int64_t h = hk * p.G; h < (hk + 1) * p.G; ++h) {
      const int64_t row_base = (b * p.Hq + h) * p.Lq;
      for (int m0 = 0; m0 < p.Lq; m0 += kBwdStep) {
        __syncthreads();  // the previous step's readers are done
        load_tile<T, D, kBwdStep>(Qs, slab<T>(p.q, p.q_s, b, h), m0, p.Lq);
        load_tile<T, D, kBwdStep>(dOs, slab<T>(p.dout, p.dout_s, b, h), m0, p.Lq);
        if (threadIdx.x < kBwdStep) {  // padded query rows: lse = +inf, so P = 0
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
            e[i] = keep[i >> 1] ? exp2f(st[nt][i] * p.scale_log2 - lse2[col]) : 0.f;
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
  }
  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  const int row0 = n0 + warp * 16;
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
  float* bias = reinterpret_cast<float*>(Vs + kTile * ld<D>());

  const int warp = threadIdx.x / 32;
  const Lane ln(threadIdx.x % 32);
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq, hk = h / p.G;
  const int m0 = blockIdx.y * kTile, row0 = m0 + warp * 16;
  const bool* mask = p.mask ? p.mask + b * p.Lk : nullptr;
  const Slab<T> k = slab<T>(p.k, p.k_s, b, hk), v = slab<T>(p.v, p.v_s, b, hk);
  load_tile<T, D, kTile>(Qs, slab<T>(p.q, p.q_s, b, h), m0, p.Lq);
  load_tile<T, D, kTile>(dOs, slab<T>(p.dout, p.dout_s, b, h), m0, p.Lq);
  const T* Qw = Qs + warp * 16 * ld<D>();
  const T* dOw = dOs + warp * 16 * ld<D>();
  float lse2[2], delta[2];  // rows g and g + 8; padded rows get P = 0
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + ln.g + 8 * r;
    lse2[r] = row < p.Lq ? p.lse[bh * p.Lq + row] * kLog2e : INFINITY;
    delta[r] = row < p.Lq ? p.delta[bh * p.Lq + row] : 0.f;
  }

  float dq[D / 8][4] = {};
  for (int n0 = 0; n0 < p.Lk; n0 += kTile) {
    const bool on = threadIdx.x < kTile && key_on(mask, n0 + threadIdx.x, p.Lk);
    if (!__syncthreads_or(on)) continue;
    if (threadIdx.x < kTile) bias[threadIdx.x] = on ? 0.f : -INFINITY;
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
        const float bias_j = bias[nt * 8 + 2 * ln.q + (i & 1)];
        const float e = exp2f(s[nt][i] * p.scale_log2 + bias_j - lse2[i >> 1]);
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

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->is_cuda() && t->device() == q.device() && t->dim() == 4 &&
                    t->scalar_type() == q.scalar_type(),
                "bidirectional_attention (cuda): q, k, v must be 4-d tensors of one dtype on "
                "one CUDA device");
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "bidirectional_attention (cuda): dtype must be float16 or bfloat16");
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128,
              "bidirectional_attention (cuda): D must be 64 or 128; got ", q.size(3));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "bidirectional_attention (cuda): Hq must be a multiple of Hkv");
  TORCH_CHECK(q.size(2) < (1 << 30) && k.size(2) < (1 << 30),
              "bidirectional_attention (cuda): sequence lengths must be < 2^30");
  TORCH_CHECK(!mask || (mask->device() == q.device() && mask->scalar_type() == at::kBool &&
                        mask->is_contiguous()),
              "bidirectional_attention (cuda): key_padding_mask must be contiguous bool on q's device");
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& mask, double scale) {
  Params p{};
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.mask = mask ? mask->data_ptr<bool>() : nullptr;
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

std::tuple<at::Tensor, at::Tensor> bidirectional_attention_fwd_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& key_padding_mask, double scale) {
  check_inputs(q_, k_, v_, key_padding_mask);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = aligned(q_), k = aligned(k_), v = aligned(v_);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options().dtype(at::kFloat));
  Params p = make_params(q, k, v, key_padding_mask, scale);
  p.o = out.data_ptr(), p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(B * Hq), tiles(Lq, kTile));
  dispatch(q.scalar_type(), D, [&]<typename T, int kD>() {
    const size_t smem = 3 * kTile * ld<kD>() * sizeof(T) + kTile * sizeof(float);
    launch(attention_fwd_kernel<T, kD>, grid, smem, p, stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bidirectional_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse_, double scale) {
  check_inputs(q_, k_, v_, key_padding_mask);
  TORCH_CHECK(grad_out.device() == q_.device() && out.device() == q_.device() &&
                  grad_out.scalar_type() == q_.scalar_type() &&
                  out.scalar_type() == q_.scalar_type() && lse_.scalar_type() == at::kFloat,
              "bidirectional_attention (cuda): grad_out and out must match q; lse must be fp32");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = aligned(q_), k = aligned(k_), v = aligned(v_), dout = aligned(grad_out);
  const at::Tensor lse = lse_.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), Lq = q.size(2), Lk = k.size(2);
  const int64_t D = q.size(3);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({B, Hq, Lq}, lse.options());
  Params p = make_params(q, k, v, key_padding_mask, scale);
  p.dout = dout.data_ptr(), p.out = out.data_ptr();
  set_strides(p.dout_s, dout), set_strides(p.out_s, out);
  p.lse = const_cast<float*>(lse.data_ptr<float>()), p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), D, [&]<typename T, int kD>() {
    const dim3 rows(static_cast<unsigned>(B * Hq), tiles(Lq, kThreads / 32));
    if (rows.x > 0 && rows.y > 0) {
      attention_delta_kernel<T><<<rows, kThreads, 0, stream>>>(p, kD);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const size_t dkdv_smem = (2 * kTile + 2 * kBwdStep) * ld<kD>() * sizeof(T) +
                             2 * kBwdStep * sizeof(float);
    launch(attention_dkdv_kernel<T, kD>, dim3(static_cast<unsigned>(B * Hkv), tiles(Lk, kTile)),
           dkdv_smem, p, stream);
    const size_t dq_smem = 4 * kTile * ld<kD>() * sizeof(T) + kTile * sizeof(float);
    launch(attention_dq_kernel<T, kD>, dim3(static_cast<unsigned>(B * Hq), tiles(Lq, kTile)),
           dq_smem, p, stream);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("bidirectional_attention_fwd", &bidirectional_attention_fwd_cuda);
  m.impl("bidirectional_attention_bwd", &bidirectional_attention_bwd_cuda);
}

}  // namespace llada
