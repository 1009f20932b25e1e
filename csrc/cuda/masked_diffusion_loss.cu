// CUDA kernels of the masked diffusion loss (schemas: csrc/ops.cpp).
//
// Row r holds the logits x[0..V) of one (batch, position), its target t and its weight
// w = 1 / p_mask (0 where not masked: the row is skipped, its ce and gradient are zero). Its
// stats are m = max_j x_j and ls = log sum_j exp(x_j - m), kept apart (at large logits m + ls
// rounds to m):
//
//   ce_r   = ls + (m - x_t)
//   dx_j   = g_r * (exp((x_j - m) - ls) - [j == t])      (g_r: the gradient of ce_r)
//
// A row with a NaN or +inf logit gets stats (NaN, NaN), a row of -inf (-inf, -inf) (the max
// and the log of an empty sum, which a vocabulary-parallel shard may hold); either way its ce
// and gradient are NaN (README, "Non-finite and extreme inputs").
//
// One thread block per row. Forward: each thread keeps an online (max m, sum s of exp(x - m))
// over a strided slice of the row, one exp per element:
//
//   x > m :  s = s * exp(m - x) + 1,  m = x          otherwise :  s += exp(x - m)
//
// and the block merges the pairs, (m1, s1) + (m2, s2) = (M, s1 exp(m1 - M) + s2 exp(m2 - M)).
// Backward: one sweep that reads x and writes dx. The in-place form (the fused-linear chunks)
// does both in one block, overwriting the row it has just reduced: no second buffer.
// Arithmetic in fp32 (fp64 for fp64 logits); row offsets in int64. A target outside [0, V)
// gives a NaN loss and no one-hot term, never an out-of-bounds read.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda/std/limits>

#include "common/masked_diffusion_loss.h"

namespace llada::mdl {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename A>
struct MaxSum {
  A m, s;
};

template <typename A>
struct Stats {
  A m;   // the row max
  A ls;  // log sum_j exp(x_j - m)
};

// A pair whose m is -inf has s = 0, or NaN when it has seen a NaN logit (NaN > m is false):
// merging two such pairs adds their s, so that the NaN survives.
template <typename A>
__device__ __forceinline__ MaxSum<A> merge(MaxSum<A> a, MaxSum<A> b) {
  const A m = (a.m > b.m || a.m != a.m) ? a.m : b.m;  // NaN propagates
  if (m == -cuda::std::numeric_limits<A>::infinity()) return {m, a.s + b.s};
  return {m, a.s * exp(a.m - m) + b.s * exp(b.m - m)};
}

// The block's (max, sum) over every thread's pair, returned to every thread as the row's stats
// (m, log s): (NaN, NaN) when m is NaN or +inf, or s is NaN (a NaN logit); (-inf, -inf) when
// every logit is -inf (m = -inf, s = 0).
template <typename A>
__device__ Stats<A> block_stats(MaxSum<A> p) {
  __shared__ A sm[kWarps], ss[kWarps];
  __shared__ Stats<A> result;
  for (int offset = 16; offset > 0; offset /= 2)
    p = merge(p, MaxSum<A>{__shfl_xor_sync(0xffffffffu, p.m, offset), __shfl_xor_sync(0xffffffffu, p.s, offset)});
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sm[warp] = p.m, ss[warp] = p.s;
  __syncthreads();
  if (warp == 0) {
    p = lane < kWarps ? MaxSum<A>{sm[lane], ss[lane]}
                      : MaxSum<A>{-cuda::std::numeric_limits<A>::infinity(), A(0)};
    for (int offset = 16; offset > 0; offset /= 2)
      p = merge(p, MaxSum<A>{__shfl_xor_sync(0xffffffffu, p.m, offset), __shfl_xor_sync(0xffffffffu, p.s, offset)});
    if (lane == 0) {
      const A nan = cuda::std::numeric_limits<A>::quiet_NaN();
      const A inf = cuda::std::numeric_limits<A>::infinity();
      const bool ok = fabs(p.m) < inf && p.s == p.s;
      const A bad = p.m == -inf && p.s == A(0) ? -inf : nan;  // every logit -inf, or NaN/+inf
      result.m = ok ? p.m : bad;
      result.ls = ok ? log(p.s) : bad;
    }
  }
  __syncthreads();
  return result;
}

// The row's stats (see block_stats).
template <typename T, typename A = at::opmath_type<T>>
__device__ Stats<A> row_stats(const T* __restrict__ x, int64_t V) {
  constexpr A kNegInf = -cuda::std::numeric_limits<A>::infinity();
  MaxSum<A> p{kNegInf, A(0)};
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const A v = static_cast<A>(x[j]);
    if (v > p.m) {
      p.s = p.s * exp(p.m - v) + A(1);
      p.m = v;
    } else if (p.m != kNegInf || v != v) {
      p.s += exp(v - p.m);
    }
  }
  return block_stats(p);
}

template <typename T, typename A>
__device__ __forceinline__ A target_logit(const T* x, int64_t V, int64_t t) {
  return (0 <= t && t < V) ? static_cast<A>(x[t]) : cuda::std::numeric_limits<A>::quiet_NaN();
}

// dx_j = scale * (exp((x_j - m) - ls) - [j == t]); dx may alias x (each element is read, then
// written by the same thread).
template <typename T, typename A>
__device__ void row_grad(const T* x, T* dx, int64_t V, int64_t t, Stats<A> st, A scale) {
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const A p = exp((static_cast<A>(x[j]) - st.m) - st.ls);
    dx[j] = static_cast<T>((j == t ? p - A(1) : p) * scale);
  }
}

template <typename T>
__device__ void row_zero(T* dx, int64_t V) {
  for (int64_t j = threadIdx.x; j < V; j += kThreads) dx[j] = T(0);
}

template <typename T, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads) fwd_kernel(
    const T* __restrict__ logits, const int64_t* __restrict__ targets, const A* __restrict__ weights,
    A* __restrict__ ce, A* __restrict__ stats, int64_t V, int64_t stride_row) {
  const int64_t r = blockIdx.x;
  const T* x = logits + r * stride_row;
  Stats<A> st{A(0), A(0)};
  if (weights[r] != A(0)) st = row_stats<T>(x, V);  // block-uniform: it synchronises
  if (threadIdx.x == 0) {
    ce[r] = weights[r] == A(0) ? A(0) : st.ls + (st.m - target_logit<T, A>(x, V, targets[r]));
    stats[2 * r] = st.m;
    stats[2 * r + 1] = st.ls;
  }
}

template <typename T, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads) bwd_kernel(
    const A* __restrict__ grad_ce, const T* __restrict__ logits, const int64_t* __restrict__ targets,
    const A* __restrict__ weights, const A* __restrict__ stats, T* __restrict__ grad, int64_t V,
    int64_t stride_row) {
  const int64_t r = blockIdx.x;
  if (weights[r] == A(0)) return row_zero(grad + r * V, V);
  row_grad<T, A>(logits + r * stride_row, grad + r * V, V, targets[r],
                 Stats<A>{stats[2 * r], stats[2 * r + 1]}, grad_ce[r]);
}

template <typename T, typename A = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads) fwd_bwd_kernel(
    T* logits, const int64_t* __restrict__ targets, const A* __restrict__ weights, A* __restrict__ ce,
    int64_t V, int64_t stride_row) {
  const int64_t r = blockIdx.x;
  const A w = weights[r];
  T* x = logits + r * stride_row;
  if (w == A(0)) {
    if (threadIdx.x == 0) ce[r] = A(0);
    return row_zero(x, V);
  }
  const int64_t t = targets[r];
  const Stats<A> st = row_stats<T>(x, V);
  if (threadIdx.x == 0) ce[r] = st.ls + (st.m - target_logit<T, A>(x, V, t));
  __syncthreads();  // x[t] is read above before any thread overwrites it
  row_grad<T, A>(x, x, V, t, st, w);
}

// One block per row: N is at most 2^31 - 1 (grid.x).
dim3 grid(int64_t N) {
  TORCH_CHECK(N < (int64_t(1) << 31), "masked_diffusion_loss: N = B * L must be < 2^31; got ", N);
  return dim3(static_cast<unsigned>(N));
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                            const at::Tensor& weights) {
  check_rows("masked_diffusion_loss", logits, targets, weights);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor ce = at::empty_like(weights), stats = at::empty({N, 2}, weights.options());
  if (N == 0) return {ce, stats};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    fwd_kernel<scalar_t><<<grid(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), weights.const_data_ptr<A>(),
        ce.mutable_data_ptr<A>(), stats.mutable_data_ptr<A>(), V, logits.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ce, stats};
}

at::Tensor bwd_cuda(const at::Tensor& grad_ce, const at::Tensor& logits, const at::Tensor& targets,
                    const at::Tensor& weights, const at::Tensor& stats) {
  check_rows("masked_diffusion_loss_backward", logits, targets, weights);
  check_bwd("masked_diffusion_loss_backward", grad_ce, stats, weights);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor grad = at::empty({N, V}, logits.options());
  if (N == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    bwd_kernel<scalar_t><<<grid(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_ce.const_data_ptr<A>(), logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(),
        weights.const_data_ptr<A>(), stats.const_data_ptr<A>(), grad.mutable_data_ptr<scalar_t>(), V,
        logits.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

at::Tensor fwd_bwd_cuda(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weights) {
  check_rows("masked_diffusion_loss_fwd_bwd", logits, targets, weights);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor ce = at::empty_like(weights);
  if (N == 0) return ce;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_fwd_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    fwd_bwd_kernel<scalar_t><<<grid(N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.mutable_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), weights.const_data_ptr<A>(),
        ce.mutable_data_ptr<A>(), V, logits.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ce;
}

}  // namespace

TORCH_LIBRARY_IMPL(llada, CUDA, m) {
  m.impl("masked_diffusion_loss", &fwd_cuda);
  m.impl("masked_diffusion_loss_backward", &bwd_cuda);
  m.impl("masked_diffusion_loss_fwd_bwd", &fwd_bwd_cuda);
}

}  // namespace llada::mdl
