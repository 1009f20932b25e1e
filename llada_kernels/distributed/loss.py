"""Vocabulary-parallel masked diffusion loss: each rank holds the logits (or lm_head rows) of
ids [offset, offset + V_r); the ranks exchange per-row statistics, never logits.

Per masked row, rank i's row kernel (llada::masked_diffusion_loss, the single-device kernel
on the shard) gives its shard's stats (m_i, ls_i): the max and log sum exp(x - m_i), with
(-inf, -inf) for a shard of -inf and (NaN, NaN) for one holding a NaN or +inf. The rank that
holds the row's target adds its logit x_t. One all-gather of [N, 3] and, on every rank,

    M  = max_i m_i,   LS = log sum_i exp(ls_i + (m_i - M)),   ce = LS + (M - x_t)

with (M, LS) = (NaN, NaN) when a shard had a NaN or +inf or every shard was -inf (the
single-device contract: README, "Non-finite and extreme inputs"). The backward is the
single-device backward kernel on the shard with the global (M, LS): no communication, and the
shard's gradient is exactly its slice of the single-process gradient's formula.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..ops import loss as ops
from ..reference import loss as reference
from . import _exchange

NAN = float("nan")


def masked_diffusion_loss(logits, targets, masked, p_mask, reduction, backend, group, offset):
    """llada_kernels.masked_diffusion_loss on a shard (arguments checked there, but for the
    targets, which need the whole vocabulary's size)."""
    B, L, V = logits.shape
    rows = logits.reshape(B * L, V)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    _check_vocabulary(ops.OP, group, offset, V, B * L, targets, masked, logits.device)
    weights = ops._row_weights(masked, p_mask, None, B, L, logits.dtype)  # differentiable in p_mask
    ce = _ShardedCrossEntropy.apply(rows, targets.reshape(-1) - offset, weights.detach(),
                                    backend, group)
    losses = ce * weights
    return losses.sum() if reduction == "sum" else losses.view(B, L)


def fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask, bias, chunk_size,
                                       backend, group, offset):
    """llada_kernels.fused_linear_masked_diffusion_loss with weight [V_r, D] the shard."""
    B, L, D = hidden.shape
    if backend == "reference":  # the definition: this shard's logits, materialised
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return masked_diffusion_loss(logits, targets, masked, p_mask, "sum", backend, group, offset)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    weights = ops._row_weights(masked, p_mask, None, B, L, hidden.dtype)
    return _ShardedFusedLinear.apply(hidden.reshape(B * L, D), weight, bias, targets.reshape(-1),
                                     weights, chunk_size or 0, backend, compute_grad, group,
                                     offset, masked)


# --- the statistics and their merge -----------------------------------------------------------

def shard_stats(rows, local_targets, weights, backend):
    """[N, 3]: the shard's (m, ls) (row kernel contract) and the target logit where this shard
    holds the target of an active row, NaN elsewhere."""
    if backend == "reference":
        stats = reference.row_stats(rows, weights)
    else:
        stats = ops._row_ops(backend)[0](rows, local_targets, weights)[1]
    V = rows.shape[1]
    owned = (local_targets >= 0) & (local_targets < V) & (weights != 0)
    xt = rows.gather(1, local_targets.clamp(0, V - 1)[:, None]).to(weights.dtype)
    return torch.cat([stats, torch.where(owned[:, None], xt, NAN)], 1)


def merge_stats(gathered, weights):
    """gathered [W, N, 3] (every rank's shard_stats) -> the row stats of the whole vocabulary
    [N, 2] (the row kernels' contract; (0, 0) where weight == 0) and ce [N]."""
    m, ls, xt = gathered.unbind(-1)  # [W, N] each
    broken = torch.isnan(m).any(0)  # a shard with a NaN or +inf logit
    M = torch.where(torch.isnan(m), float("-inf"), m).amax(0)
    ok = ~broken & torch.isfinite(M)  # else NaN (every shard -inf: the single-device NaN too)
    M_ref = torch.where(ok, M, 0)
    LS = torch.log(torch.exp(ls + (m - M_ref)).sum(0))
    # The target's logit: the one shard that holds it (NaN if none: a target outside [0, V)).
    x_t = torch.where(torch.isnan(xt).all(0), NAN, torch.nansum(xt, 0))
    active = weights != 0
    stats = torch.where((active & ok)[:, None], torch.stack([M, LS], 1), NAN)
    stats = torch.where(active[:, None], stats, 0)
    ce = torch.where(active, stats[:, 1] + (stats[:, 0] - x_t), 0)
    return stats, ce


def _check_vocabulary(op, group, offset, V, rows, targets, masked, device):
    """The layout check and the targets against the whole vocabulary (value checks: skipped
    with LLADA_CHECK_VALUES=0 and under torch.compile)."""
    if not _checks.values_checked():
        return None
    layout = _exchange.layout(op, group, offset, V, rows, device)
    _checks.check_index(op, "targets", targets, layout.total, where=masked)
    return layout


class _ShardedCrossEntropy(torch.autograd.Function):
    """ce [N] of the whole vocabulary from this rank's logits [N, V_r]; gradient to them."""

    @staticmethod
    def forward(ctx, rows, local_targets, weights, backend, group):
        local = shard_stats(rows, local_targets, weights, backend)
        stats, ce = merge_stats(_exchange.all_gather(local, group), weights)
        ctx.save_for_backward(rows, local_targets, weights, stats)
        ctx.backend = backend
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{ops.OP}: double backward (create_graph=True) is not supported with a "
                "vocabulary split over a process group: the softmax's statistics are the "
                "whole vocabulary's, whose second derivative needs every shard")
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        rows, local_targets, weights, stats = ctx.saved_tensors
        backward = (reference.row_grad if ctx.backend == "reference"
                    else ops._row_ops(ctx.backend)[1])
        return backward(grad_ce.contiguous(), rows, local_targets, weights, stats), None, None, None, None


class _ShardedFusedLinear(torch.autograd.Function):
    """The fused form over a vocabulary shard: the single-device chunk loop, whose per-chunk
    step exchanges the statistics before the gradient is written; d hidden all-reduced."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, chunk_size, backend, compute_grad,
                group, offset, masked):
        N, D = hidden.shape
        V = weight.shape[0]
        rows = torch.nonzero(weights).squeeze(1)  # the host sync of the single-device op
        # Every rank must run the same chunks: the layout gives the largest shard (and checks).
        layout = _exchange.layout(FUSED_OP, group, offset, V, N, hidden.device, name="weight")
        if _checks.values_checked():
            _checks.check_index(FUSED_OP, "targets", targets, layout.total, where=masked.reshape(-1))
        chunk = chunk_size if chunk_size > 0 else ops._chunk_rows(
            rows.numel(), D, layout.largest, hidden.dtype)
        fwd, bwd, _ = ops._row_ops(backend)
        acc = weights.dtype

        def step(logits, t, w):
            t = t - offset
            stats, ce = merge_stats(_exchange.all_gather(shard_stats(logits, t, w, backend), group), w)
            return ce, (bwd(w, logits, t, w, stats) if compute_grad else None)

        loss, ce, grad_hidden, grad_weight, grad_bias = ops._fused_chunks(
            hidden, weight, bias, targets, weights.detach(), rows, chunk, compute_grad, step,
            grad_hidden_dtype=acc)
        if compute_grad:  # d hidden = sum over shards of d logits_r @ W_r: the masked rows only
            part = grad_hidden.index_select(0, rows)
            torch.distributed.all_reduce(part, group=group)
            grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, part.to(hidden.dtype))
        ctx.has_bias, ctx.compute_grad = bias is not None, compute_grad
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, ce)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ops._fused_backward(ctx, grad_loss)  # the single-device op's: scale, no comm
        return grads[:5] + (None,) * 6


FUSED_OP = ops.FUSED_OP
