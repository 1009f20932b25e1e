"""Eager definition of the masked diffusion loss: the truth every backend is tested against,
and the GUIDELINES.md formulas it is tested against in turn.

LLaDA's loss (../shared/llada/SEMANTICS.md) is the cross-entropy of the masked positions only,
each divided by its mask probability p_mask:

    loss = sum over masked (b, l) of CE(logits[b, l], target[b, l]) / p_mask[b, l]

Pre-training divides it by B * L; SFT folds the answer length into the divisor (p_mask *
answer_length) and divides by B. The caller divides.

`masked_diffusion_loss` is the op's definition: the cross-entropy is taken in fp32 (fp64 for fp64
logits) whatever the logits' dtype, and its gradient comes back in the logits' dtype. The
`guidelines_*` functions are the formulas as LLaDA's GUIDELINES.md writes them, in the logits'
own dtype: the eager baselines of the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_p_mask(p_mask: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """p_mask [B] (per sequence) or [B, L] -> [B, L]."""
    return p_mask[:, None].expand(B, L) if p_mask.dim() == 1 else p_mask


def masked_diffusion_loss(logits, targets, masked, p_mask=None, *, reduction="sum",
                          token_weight=None):
    """logits [B, L, V], targets [B, L] int64, masked [B, L] bool, p_mask [B] or [B, L] (or,
    instead, token_weight [B] or [B, L]: a multiplier).

    Returns the fp32 (fp64) sum of CE / p_mask (or CE * token_weight) over masked positions, or
    with reduction="none" the [B, L] per-position terms (0 where not masked)."""
    B, L, _ = logits.shape
    acc = accumulation_dtype(logits.dtype)
    ce = F.cross_entropy(logits[masked].to(acc), targets[masked], reduction="none")
    if token_weight is not None:
        per_token = ce * expand_p_mask(token_weight, B, L).to(acc)[masked]
    else:
        per_token = ce / expand_p_mask(p_mask, B, L).to(acc)[masked]
    if reduction == "sum":
        return per_token.sum()
    return torch.zeros((B, L), dtype=acc, device=logits.device).masked_scatter(masked, per_token)


def fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask=None, *, bias=None,
                                       reduction="sum", token_weight=None):
    """hidden [B, L, D], weight [V, D], bias [V] or None: masked_diffusion_loss of the full
    logits hidden @ weight.T + bias (which it materialises, [B, L, V])."""
    return masked_diffusion_loss(F.linear(hidden, weight, bias), targets, masked, p_mask,
                                 reduction=reduction, token_weight=token_weight)


# The formulas of LLaDA's GUIDELINES.md, in the logits' dtype, as the official code computes them.

def guidelines_pretrain_loss(logits, input_ids, masked_indices, p_mask):
    """logits [B, L, V], input_ids [B, L], masked_indices [B, L] bool, p_mask [B, L]."""
    token_loss = F.cross_entropy(logits[masked_indices], input_ids[masked_indices],
                                 reduction="none") / p_mask[masked_indices]
    return token_loss.sum() / (input_ids.shape[0] * input_ids.shape[1])


def guidelines_sft_loss(logits, input_ids, masked_indices, p_mask, prompt_lengths):
    """As guidelines_pretrain_loss, plus prompt_lengths [B] int64; answer_length = L - prompt."""
    B, L = input_ids.shape
    answer_lengths = (L - prompt_lengths)[:, None].expand(B, L)
    token_loss = F.cross_entropy(logits[masked_indices], input_ids[masked_indices],
                                 reduction="none") / p_mask[masked_indices]
    return (token_loss / answer_lengths[masked_indices]).sum() / B


# The row kernels' contract (csrc/ops.cpp, llada::masked_diffusion_loss and _backward) in eager
# ops: the reference backend of the vocabulary-parallel loss, which runs on each rank's shard.

def row_stats(logits, weights):
    """logits [N, V], weights [N] -> stats [N, 2] in the weights' dtype: the row max m and
    log sum_j exp(x_j - m); (0, 0) where weight == 0, (NaN, NaN) where a logit is NaN or +inf,
    (-inf, -inf) where every logit is -inf."""
    x = logits.to(weights.dtype)
    m = x.amax(-1) if x.shape[-1] else x.new_full(x.shape[:-1], float("-inf"))
    finite = torch.isfinite(m)
    ls = torch.log(torch.exp(x - torch.where(finite, m, 0)[:, None]).sum(-1))
    bad = torch.where(m == float("-inf"), float("-inf"), float("nan"))
    stats = torch.stack([torch.where(finite, m, bad), torch.where(finite, ls, bad)], 1)
    return torch.where((weights != 0)[:, None], stats, 0)


def row_grad(grad_ce, logits, targets, weights, stats):
    """grad_ce * (exp((x - m) - ls) - onehot(targets)) [N, V] in the logits' dtype, from the
    stats (m, ls) [N, 2]; no one-hot term for a target outside [0, V); 0 where weight == 0."""
    V = logits.shape[-1]
    x = logits.to(weights.dtype)
    p = torch.exp((x - stats[:, :1]) - stats[:, 1:])
    onehot = (torch.arange(V, device=x.device) == targets[:, None]).to(p.dtype)
    grad = (p - onehot) * grad_ce[:, None]
    return torch.where((weights != 0)[:, None], grad, 0).to(logits.dtype)
