#pragma once
// What every C++ entry point of the masked diffusion loss re-checks (schemas: csrc/ops.cpp).
// The user-facing checks, with shapes named for the public API, are done once in Python
// (llada_kernels/ops/loss.py); these only guard memory safety for direct torch.ops calls.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace llada::mdl {

// logits [N, V] with unit stride along V; targets [N] int64 and weights [N] contiguous, weights
// in the logits' accumulation type (fp64 for fp64 logits, fp32 otherwise).
inline void check_rows(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                       const at::Tensor& weights) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, op,
              ": logits must be [N, V] with unit stride along V; got sizes ", logits.sizes(),
              " strides ", logits.strides());
  const int64_t n = logits.size(0);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == n && targets.is_contiguous() &&
                  targets.scalar_type() == at::kLong,
              op, ": targets must be a contiguous [", n, "] int64 tensor; got ",
              targets.scalar_type(), " ", targets.sizes());
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == n && weights.is_contiguous() &&
                  weights.scalar_type() == acc,
              op, ": weights must be a contiguous [", n, "] ", acc, " tensor; got ",
              weights.scalar_type(), " ", weights.sizes());
  TORCH_CHECK(targets.device() == logits.device() && weights.device() == logits.device(), op,
              ": logits, targets and weights must share a device");
}

// grad_ce [N] and stats [N, 2] contiguous, in the accumulation type.
inline void check_bwd(const char* op, const at::Tensor& grad_ce, const at::Tensor& stats,
                      const at::Tensor& weights) {
  const int64_t n = weights.size(0);
  TORCH_CHECK(grad_ce.sizes() == weights.sizes() && stats.dim() == 2 && stats.size(0) == n &&
                  stats.size(1) == 2,
              op, ": grad_ce must be [", n, "] and stats [", n, ", 2]; got ", grad_ce.sizes(),
              " and ", stats.sizes());
  for (const at::Tensor* t : {&grad_ce, &stats}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == weights.scalar_type() &&
                    t->device() == weights.device(),
                op, ": grad_ce and stats must be contiguous ", weights.scalar_type(),
                " tensors on ", weights.device(), "; got ", t->scalar_type(), " on ", t->device());
  }
}

}  // namespace llada::mdl
