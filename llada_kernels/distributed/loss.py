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

token_weight and reduction="none" compose with this because both act per row after the merge:
the loss is sum (or the vector) of w_r * ce_r with ce_r the whole vocabulary's, whatever w_r is
(1 / p_mask or token_weight); the rows run are the single-device op's (a masked row of
token_weight 0 runs where its d token_weight = CE is needed). The fused form's "none" keeps the
merged (M, LS) of each row, so its backward (recomputed chunks, Liger's scheme as on one device)
exchanges no statistics; it all-reduces d hidden, the one collective the maths needs.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..ops import loss as ops
from ..reference import loss as reference
from . import _exchange

NAN = float("nan")


def masked_diffusion_loss(logits, targets, masked, p_mask, token_weight, reduction, backend,
                          group, offset):
    """llada_kernels.masked_diffusion_loss on a shard (arguments checked there, but for the
    targets, which need the whole vocabulary's size). token_weight composes as on one device:
    it only scales each row's whole-vocabulary ce after the exchange."""
    B, L, V = logits.shape
    rows = logits.reshape(B * L, V)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    _check_vocabulary(ops.OP, group, offset, V, B * L, targets, masked, logits.device)
    weights = ops._row_weights(masked, p_mask, token_weight, B, L, logits.dtype)  # differentiable
    # The rows run, as on one device: every masked row (a token_weight of 0 included).
    active = weights.detach() if token_weight is None else masked.reshape(-1).to(weights.dtype)
    ce = _ShardedCrossEntropy.apply(rows, targets.reshape(-1) - offset, active, backend, group)
    losses = ce * weights
    return losses.sum() if reduction == "sum" else losses.view(B, L)


def fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask, token_weight,
                                       bias, reduction, chunk_size, backend, group, offset):
    """llada_kernels.fused_linear_masked_diffusion_loss with weight [V_r, D] the shard."""
    B, L, D = hidden.shape
    if backend == "reference":  # the definition: this shard's logits, materialised
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return masked_diffusion_loss(logits, targets, masked, p_mask, token_weight, reduction,
                                     backend, group, offset)
    weights = ops._row_weights(masked, p_mask, token_weight, B, L, hidden.dtype)
    hidden, targets = hidden.reshape(B * L, D), targets.reshape(-1)
    if reduction == "none":  # every masked row, as on one device
        return _ShardedFusedPerToken.apply(hidden, weight, bias, targets, weights, masked,
                                           chunk_size or 0, backend, group, offset).view(B, L)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    # The rows run: those of weight != 0, and, as on one device, the masked rows of weight 0
    # too when token_weight needs its gradient there (d loss / d token_weight = CE).
    idle_rows = (token_weight is not None and token_weight.requires_grad
                 and torch.is_grad_enabled())
    active = masked.reshape(-1).to(weights.dtype) if idle_rows else weights.detach()
    return _ShardedFusedLinear.apply(hidden, weight, bias, targets, weights, active, masked,
                                     chunk_size or 0, backend, compute_grad, group, offset)


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


def _plan(hidden, weight, targets, masked, active, chunk_size, group, offset):
    """The rows to run (active != 0, [M]) and the chunk size, the same on every rank (sized
    from the largest shard), after the layout check and the targets' against the whole
    vocabulary (one small all-gather and the host sync of the single-device op)."""
    N, D = hidden.shape
    rows = torch.nonzero(active).squeeze(1)
    layout = _exchange.layout(FUSED_OP, group, offset, weight.shape[0], N, hidden.device,
                              name="weight", active=rows.numel())
    if _checks.values_checked():
        _checks.check_index(FUSED_OP, "targets", targets, layout.total, where=masked.reshape(-1))
    chunk = chunk_size if chunk_size > 0 else ops._chunk_rows(
        rows.numel(), D, layout.largest, hidden.dtype)
    return rows, chunk


def _run(hidden, weight, bias, targets, weights, rows, chunk, offset, compute_grad, step):
    """The single-device chunk loop (ops._fused_chunks) on the rows, step(logits [C, V_r],
    shard-local targets [C], w [C], index [C]) per chunk; d hidden in the accumulation dtype
    (it is all-reduced). Returns _fused_chunks' five outputs."""
    return ops._fused_chunks(hidden, weight, bias, targets, weights, rows, chunk, compute_grad,
                             lambda logits, t, w, index: step(logits, t - offset, w, index),
                             grad_hidden_dtype=weights.dtype)


def _exchange_step(active, backend, group, compute_grad, stats_out=None):
    """The forward's per-chunk step: the shard statistics of the chunk's active rows,
    exchanged and merged (ce); the gradient of sum(w * ce) in the logits from the merged
    statistics; stats_out [N, 2], if given, keeps them for a later backward."""
    _, bwd, _ = ops._row_ops(backend)

    def step(logits, t, w, index):
        a = active.index_select(0, index)
        stats, ce = merge_stats(_exchange.all_gather(shard_stats(logits, t, a, backend), group), a)
        if stats_out is not None:
            stats_out.index_copy_(0, index, stats)
        return ce, (bwd(w, logits, t, w, stats) if compute_grad else None)

    return step


def _all_reduce_rows(grad_hidden, rows, group, dtype):
    """d hidden = sum over shards of d logits_r @ W_r, on the rows run: one all-reduce of
    [M, D] in the accumulation dtype (the collective a column-parallel lm_head's backward
    needs). Returns [N, D] in `dtype`."""
    part = grad_hidden.index_select(0, rows)
    torch.distributed.all_reduce(part, group=group)
    return torch.zeros(grad_hidden.shape, dtype=dtype, device=grad_hidden.device).index_copy_(
        0, rows, part.to(dtype))


class _ShardedFusedLinear(torch.autograd.Function):
    """The fused form over a vocabulary shard: the single-device chunk loop, whose per-chunk
    step exchanges the statistics before the gradient is written; d hidden all-reduced."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, active, masked, chunk_size, backend,
                compute_grad, group, offset):
        rows, chunk = _plan(hidden, weight, targets, masked, active, chunk_size, group, offset)
        loss, ce, grad_hidden, grad_weight, grad_bias = _run(
            hidden, weight, bias, targets, weights.detach(), rows, chunk, offset, compute_grad,
            _exchange_step(active, backend, group, compute_grad))
        if compute_grad:
            grad_hidden = _all_reduce_rows(grad_hidden, rows, group, hidden.dtype)
        ctx.has_bias, ctx.compute_grad = bias is not None, compute_grad
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, ce)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ops._fused_backward(ctx, grad_loss)  # the single-device op's: scale, no comm
        return grads[:5] + (None,) * 7


class _ShardedFusedPerToken(torch.autograd.Function):
    """reduction="none" over a vocabulary shard (ops._FusedPerToken's scheme): the forward
    runs the masked rows without gradients and keeps their whole-vocabulary statistics; the
    backward recomputes the same chunks with row weights w * g and writes the gradient from
    the kept statistics (nothing exchanged), then all-reduces d hidden. d w = g * ce."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, masked, chunk_size, backend, group,
                offset):
        active = masked.reshape(-1).to(weights.dtype)
        rows, chunk = _plan(hidden, weight, targets, masked, active, chunk_size, group, offset)
        stats = torch.zeros((hidden.shape[0], 2), dtype=weights.dtype, device=hidden.device)
        _, ce, *_ = _run(hidden, weight, bias, targets, active, rows, chunk, offset, False,
                         _exchange_step(active, backend, group, False, stats_out=stats))
        ctx.save_for_backward(hidden, weight, bias, targets, weights, ce, stats, rows)
        ctx.args = (chunk, backend, group, offset)
        return ce * weights.detach()

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{FUSED_OP}: double backward (create_graph=True) is not "
                               "supported with a vocabulary split over a process group")
        hidden, weight, bias, targets, weights, ce, stats, rows = ctx.saved_tensors
        chunk, backend, group, offset = ctx.args
        needs = ctx.needs_input_grad
        grads = [None, None, None]
        if any(needs[:3]):
            folded = (weights.detach() * grad.to(weights.dtype)).contiguous()
            _, bwd, _ = ops._row_ops(backend)

            def step(logits, t, f, index):  # the kept statistics: nothing exchanged
                return f, bwd(f, logits, t, f, stats.index_select(0, index))

            # The forward's rows and chunks (the same on every rank, whatever grad is): a row
            # of f == 0 gets a zero gradient.
            _, _, gh, gw, gb = _run(hidden, weight, bias, targets, folded, rows, chunk, offset,
                                    True, step)
            grads = [_all_reduce_rows(gh, rows, group, hidden.dtype), gw,
                     gb if bias is not None else None]
            grads = [g if need else None for g, need in zip(grads, needs[:3])]
        grad_weights = grad.to(ce.dtype) * ce if needs[4] else None
        return grads[0], grads[1], grads[2], None, grad_weights, None, None, None, None, None


FUSED_OP = ops.FUSED_OP
