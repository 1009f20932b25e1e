// C++ CPU kernels of the masked diffusion loss (schemas: csrc/ops.cpp).
//
// Row r holds the logits x[0..V) of one (batch, position) pair, its clean token t and its
// weight w = 1 / p_mask (0 when the position is not masked: the row is skipped). With
// m = max_j x_j:
//
//   lse      = m + log sum_j exp(x_j - m)
//   loss_r   = w * (lse - x_t)                                 (cross-entropy / p_mask)
//   dx_j     = g * w * (exp(x_j - lse) - [j == t])             (g: upstream gradient)
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

// log sum_j exp(x_j), in two sweeps. NaN in x propagates.
template <typename T>
acc_t<T> row_logsumexp(const T* x, int64_t V) {
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
  if (std::isinf(m)) return m;  // every logit -inf (lse = -inf), or some +inf

  const AVec<T> vm(m);
  AVec<T> s0(A(0)), s1(A(0));
  for (int64_t j = 0; j < vend; j += kStep<T>) {
    load2(x + j, a, b);
    s0 += (a - vm).exp();
    s1 += (b - vm).exp();
  }
  A s = horizontal(s0 + s1, std::plus<A>());
  for (int64_t j = vend; j < V; ++j) s += std::exp(static_cast<A>(x[j]) - m);
  return m + std::log(s);
}

// dx_j = scale * (exp(x_j - lse) - [j == t]). dx may alias x (the in-place form).
template <typename T>
void row_grad(const T* x, T* dx, int64_t V, int64_t t, acc_t<T> lse, acc_t<T> scale) {
  using A = acc_t<T>;
  const bool has_target = 0 <= t && t < V;
  const A xt = has_target ? static_cast<A>(x[t]) : A(0);  // read before dx overwrites it
  const int64_t vend = V - V % kStep<T>;
  const AVec<T> vlse(lse), vscale(scale);
  AVec<T> a, b;
  for (int64_t j = 0; j < vend; j += kStep<T>) {
    load2(x + j, a, b);
    store2(dx + j, (a - vlse).exp() * vscale, (b - vlse).exp() * vscale);
  }
  for (int64_t j = vend; j < V; ++j) dx[j] = static_cast<T>(std::exp(static_cast<A>(x[j]) - lse) * scale);
  if (has_target) dx[t] = static_cast<T>(std::expm1(xt - lse) * scale);
}

template <typename T>
void row_zero(T* dx, int64_t V) {
  std::fill(dx, dx + V, T(0));
}

// w * (lse - x_t), NaN for a target outside [0, V).
template <typename T>
inline acc_t<T> row_loss(const T* x, int64_t V, int64_t t, acc_t<T> lse, acc_t<T> w) {
  if (t < 0 || t >= V) return std::numeric_limits<acc_t<T>>::quiet_NaN();
  return w * (lse - static_cast<acc_t<T>>(x[t]));
}

// Rows per parallel task: about 32K elements, as ATen's own grain size.
constexpr int64_t kGrainElements = 32768;
int64_t grain(int64_t V) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(V, 1)); }

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                           const at::Tensor& weights) {
  check_rows("masked_diffusion_loss", logits, targets, weights);
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor losses = at::empty_like(weights), lse = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_fwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const A* w = weights.const_data_ptr<A>();
    A* out = losses.mutable_data_ptr<A>();
    A* out_lse = lse.mutable_data_ptr<A>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (w[r] == A(0)) {
          out[r] = A(0);
          out_lse[r] = A(0);
          continue;
        }
        const scalar_t* row = x + r * ld;
        out_lse[r] = row_logsumexp(row, V);
        out[r] = row_loss(row, V, t[r], out_lse[r], w[r]);
      }
    });
  });
  return {losses, lse};
}

at::Tensor bwd_cpu(const at::Tensor& grad_losses, const at::Tensor& logits, const at::Tensor& targets,
                   const at::Tensor& weights, const at::Tensor& lse) {
  check_rows("masked_diffusion_loss_backward", logits, targets, weights);
  check_bwd("masked_diffusion_loss_backward", grad_losses, lse, weights);
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor grad = at::empty({N, V}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* dx = grad.mutable_data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const A* w = weights.const_data_ptr<A>();
    const A* g = grad_losses.const_data_ptr<A>();
    const A* l = lse.const_data_ptr<A>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (w[r] == A(0)) {
          row_zero(dx + r * V, V);  // unmasked rows: exactly zero, whatever g is
        } else {
          row_grad(x + r * ld, dx + r * V, V, t[r], l[r], g[r] * w[r]);
        }
      }
    });
  });
  return grad;
}

at::Tensor fwd_bwd_cpu(at::Tensor& logits, const at::Tensor& targets, const at::Tensor& weights) {
  check_rows("masked_diffusion_loss_fwd_bwd", logits, targets, weights);
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor losses = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdl_fwd_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    scalar_t* x = logits.mutable_data_ptr<scalar_t>();
    const int64_t* t = targets.const_data_ptr<int64_t>();
    const A* w = weights.const_data_ptr<A>();
    A* out = losses.mutable_data_ptr<A>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = x + r * ld;
        if (w[r] == A(0)) {
          out[r] = A(0);
          row_zero(row, V);
          continue;
        }
        const A lse = row_logsumexp(row, V);
        out[r] = row_loss(row, V, t[r], lse, w[r]);
        row_grad(row, row, V, t[r], lse, w[r]);  // the row is still in cache
      }
    });
  });
  return losses;
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
