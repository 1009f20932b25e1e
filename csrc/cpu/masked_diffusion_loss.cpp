// C++ CPU kernels of the masked diffusion loss (schemas: csrc/ops.cpp).
//
// Row r holds the logits x[0..V) of one (batch, position) pair, its clean token t and its
// weight w = 1 / p_mask (0 when the position is not masked: the row is skipped). With
// m = max_j x_j and ls = log sum_j exp(x_j - m) (the row's stats):
//
//   ce_r     = ls + (m - x_t)                                  (the cross-entropy)
//   dx_j     = g * (exp((x_j - m) - ls) - [j == t])            (g: the gradient of ce_r)
//
// m and ls are kept apart, never summed into a log-sum-exp: at large logits (32 equal logits
// of 1e8) m + ls rounds to m, and both the loss and the gradient would lose ls.
// Non-finite logits: a row with a NaN or +inf logit gets stats (NaN, NaN), a row of -inf
// (-inf, -inf) (the max and the log of an empty sum: a shard of a vocabulary-parallel row may
// hold only -inf, llada_kernels/distributed); either way its ce and every dx_j are NaN, as eager
// PyTorch gives; a -inf target under a finite max gives ce = +inf and a finite gradient
// (README, "Non-finite and extreme inputs").
//
// The forward makes two vectorised sweeps over a row (its max, then the sum of exponentials:
// one exp per element, cheaper on a CPU than the online rescaling), the backward one sweep that
// reads x and writes dx. The target element is finished in scalar code with expm1, which keeps
// p_t - 1 accurate when p_t is close to 1. Rows run in parallel (at::parallel_for); each row's
// arithmetic is in fp32 (fp64 for fp64 logits), whatever the storage type.
//
// A target outside [0, V) on a weighted row (Python rejects it unless LLADA_CHECK_VALUES=0)
// gives a NaN loss and no one-hot term: never an out-of-bounds read.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/masked_diffusion_loss.h"
#include "isa.h"

namespace llada::mdl {
namespace CPU_CAPABILITY {  // one copy per CPU capability (isa.h)
namespace {

using at::vec::Vectorized;
template <typename T>
using acc_t = at::opmath_type<T>;  // float for fp32/bf16/fp16, double for fp64
template <typename T>
using AVec = Vectorized<acc_t<T>>;

// Elements per step: two accumulation vectors (one Vectorized<BFloat16> for reduced types).
template <typename T>
constexpr int64_t kStep = 2 * AVec<T>::size();

template <typename T>
inline void load2(const T* p, AVec<T>& a, AVec<T>& b) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    a = AVec<T>::loadu(p);
    b = AVec<T>::loadu(p + AVec<T>::size());
  } else {
    at::vec::load_to_float(p, a, b);
  }
}

template <typename T>
inline void store2(T* p, const AVec<T>& a, const AVec<T>& b) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    a.store(p);
    b.store(p + AVec<T>::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

template <typename A, typename Op>
inline A horizontal(const Vectorized<A>& v, Op op) {
  A lanes[Vectorized<A>::size()];
  v.store(lanes);
  A r = lanes[0];
  for (int64_t i = 1; i < Vectorized<A>::size(); ++i) r = op(r, lanes[i]);
  return r;
}

template <typename A>
struct Stats {
  A m;   // max_j x_j
  A ls;  // log sum_j exp(x_j - m)
};

// The row's stats, in two sweeps; (NaN, NaN) when the max is NaN or +inf, (-inf, -inf) when it
// is -inf.
template <typename T>
Stats<acc_t<T>> row_stats(const T* x, int64_t V) {
  using A = acc_t<T>;
  const int64_t vend = V - V % kStep<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  auto nan_max = [](A p, A q) { return (p != p || p > q) ? p : q; };

  AVec<T> m0(kNegInf), m1(kNegInf), a, b;
  for (int64_t j = 0; j < vend; j += kStep<T>) {
    load2(x + j, a, b);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
  }
  A m = horizontal(at::vec::maximum(m0, m1), nan_max);
  for (int64_t j = vend; j < V; ++j) m = nan_max(m, static_cast<A>(x[j]));
  if (!std::isfinite(m)) {
    const A v = m == kNegInf ? kNegInf : std::numeric_limits<A>::quiet_NaN();
    return {v, v};
  }

  const AVec<T> vm(m);
  AVec<T> s0(A(0)), s1(A(0));
  for (int64_t j = 0; j < vend; j += kStep<T>) {
    load2(x + j, a, b);
    s0 += (a - vm).exp();
    s1 += (b - vm).exp();
  }
  A s = horizontal(s0 + s1, std::plus<A>());
  for (int64_t j = vend; j < V; ++j) s += std::exp(static_cast<A>(x[j]) - m);
  return {m, std::log(s)};
}

// dx_j = scale * (exp((x_j - m) - ls) - [j == t]). dx may alias x (the in-place form).
template <typename T>
void row_grad(const T* x, T* dx, int64_t V, int64_t t, Stats<acc_t<T>> st, acc_t<T> scale) {
  using A = acc_t<T>;
  const bool has_target = 0 <= t && t < V;
  const A xt = has_target ? static_cast<A>(x[t]) : A(0);  // read before dx overwrites it
  const int64_t vend = V - V % kStep<T>;
  const AVec<T> vm(st.m), vls(st.ls), vscale(scale);
  AVec<T> a, b;
  for (int64_t j = 0; j < vend; j += kStep<T>) {
    load2(x + j, a, b);
    store2(dx + j, ((a - vm) - vls).exp() * vscale, ((b - vm) - vls).exp() * vscale);
  }
  for (int64_t j = vend; j < V; ++j) {
    dx[j] = static_cast<T>(std::exp((static_cast<A>(x[j]) - st.m) - st.ls) * scale);
  }
  if (has_target) dx[t] = static_cast<T>(std::expm1((xt - st.m) - st.ls) * scale);
}

template <typename T>
void row_zero(T* dx, int64_t V) {
  std::fill(dx, dx + V, T(0));
}

// ce = ls + (m - x_t), NaN for a target outside [0, V).
template <typename T>
inline acc_t<T> row_ce(const T* x, int64_t V, int64_t t, Stats<acc_t<T>> st) {
  if (t < 0 || t >= V) return std::numeric_limits<acc_t<T>>::quiet_NaN();
  return st.ls + (st.m - static_cast<acc_t<T>>(x[t]));
}

// Rows per parallel task: about 32K elements, as ATen's own grain size.
constexpr int64_t kGrainElements = 32768;
int64_t grain(int64_t V) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                           const at::Tensor& weights) {
  check_rows("masked_diffusion_loss", logits, targets, weights);
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor ce = at::empty_like(weights), stats = at::empty({N, 2}, weights.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const A* w = weights.const_data_ptr<A>();
    A* out = ce.mutable_data_ptr<A>();
    A* out_stats = stats.mutable_data_ptr<A>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        Stats<A> st{A(0), A(0)};
        if (w[r] == A(0)) {
          out[r] = A(0);
        } else {
          const scalar_t* row = x + r * ld;
          st = row_stats(row, V);
          out[r] = row_ce(row, V, t[r], st);
        }
        out_stats[2 * r] = st.m;
        out_stats[2 * r + 1] = st.ls;
      }
    });
  });
  return {ce, stats};
}

at::Tensor bwd_cpu(const at::Tensor& grad_ce, const at::Tensor& logits, const at::Tensor& targets,
                   const at::Tensor& weights, const at::Tensor& stats) {
  check_rows("masked_diffusion_loss_backward", logits, targets, weights);
  check_bwd("masked_diffusion_loss_backward", grad_ce, stats, weights);
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor grad = at::empty({N, V}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const A* w = weights.const_data_ptr<A>();
    const A* g = grad_ce.const_data_ptr<A>();
    const A* st = stats.const_data_ptr<A>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (w[r] == A(0)) {
          row_zero(dx + r * V, V);  // unmasked rows: exactly zero, whatever g is
        } else {
          row_grad(x + r * ld, dx + r * V, V, t[r], Stats<A>{st[2 * r], st[2 * r + 1]}, g[r]);
        }
      }
    });
  });
  return grad;
}

at::Tensor fwd_bwd_cpu(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weights) {
  check_rows("masked_diffusion_loss_fwd_bwd", logits, targets, weights);
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor ce = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_fwd_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const A* w = weights.const_data_ptr<A>();
    A* out = ce.mutable_data_ptr<A>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = x + r * ld;
        if (w[r] == A(0)) {
          out[r] = A(0);
          row_zero(row, V);
          continue;
        }
        const Stats<A> st = row_stats(row, V);
        out[r] = row_ce(row, V, t[r], st);
        row_grad(row, row, V, t[r], st, w[r]);  // the row is still in cache
      }
    });
  });
  return ce;
}

}  // namespace
}  // namespace CPU_CAPABILITY

LLADA_ISA_KERNEL(fwd_stub, CPU_CAPABILITY::fwd_cpu);
LLADA_ISA_KERNEL(bwd_stub, CPU_CAPABILITY::bwd_cpu);
LLADA_ISA_KERNEL(fwd_bwd_stub, CPU_CAPABILITY::fwd_bwd_cpu);

#ifdef CPU_CAPABILITY_DEFAULT  // registered once; each call runs the copy in use
TORCH_LIBRARY_IMPL(llada, CPU, m) {
  m.impl("masked_diffusion_loss", LLADA_ISA_DISPATCH(fwd_stub));
  m.impl("masked_diffusion_loss_backward", LLADA_ISA_DISPATCH(bwd_stub));
  m.impl("masked_diffusion_loss_fwd_bwd", LLADA_ISA_DISPATCH(fwd_bwd_stub));
}
#endif

}  // namespace llada::mdl
