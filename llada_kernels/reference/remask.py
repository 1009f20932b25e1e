"""Eager definition of one LLaDA sampling step: the truth every remask_step backend is
tested against.

It follows ML-GSAI/LLaDA generate.py (see ../shared/llada/SEMANTICS.md) with three deliberate
differences, each documented in llada_kernels.remask_step:
  * confidences are computed in fp32 whatever the logits' dtype (the reference uses the
    logits' dtype, so bf16 confidences tie often);
  * ties in confidence are broken by position, lower index first (torch.topk leaves the
    order unspecified);
  * k larger than a row's candidates commits every candidate and nothing else (the reference
    would also write masked positions right of the block).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def combined_logits(logits, uncond_logits=None, cfg_scale=0.0):
    """fp32 logits after classifier-free guidance: un + (s + 1) * (cond - un)."""
    out = logits.float()
    if uncond_logits is not None:
        un = uncond_logits.float()
        out = un + (cfg_scale + 1.0) * (out - un)
    return out


def _fill_ids(t, ids, value=NEG_INF):
    if not ids:
        return t
    index = torch.tensor(sorted(set(ids)), dtype=torch.long, device=t.device)
    return t.index_fill(-1, index, value)


def gumbel_argmax(l, temperature, generator=None):
    """argmax over the last dim of l + T * Gumbel, with float64 noise as LLaDA draws it.

    LLaDA: argmax(exp(l) / (-log u)^T), u ~ U[0, 1) in float64. Taking logs gives the same
    argmax, l - T * log(-log u), without overflowing exp. torch.argmax ranks NaN above every
    number, so a NaN logit wins whatever the noise, then a +inf one (finite noise keeps +inf at
    +inf and a finite logit finite in float64); a -inf logit never wins over a finite one.
    """
    if temperature == 0:
        return l.argmax(-1)
    u = torch.rand(l.shape, dtype=torch.float64, device=l.device, generator=generator)
    return (l.double() - temperature * torch.log(-torch.log(u))).argmax(-1)


def first_allowed_id(suppress_ids=(), start=0):
    """The lowest id (>= start) not in suppress_ids: x0 of a row whose choice logits are all
    -inf."""
    banned, i = set(suppress_ids), start
    while i in banned:
        i += 1
    return i


def choose(l, temperature, suppress_ids=(), generator=None):
    """x0 [B, L] from the choice logits l [B, L, V] (suppress_ids already at -inf): the
    (Gumbel-)argmax, ties to the lowest id, NaN above +inf above every finite number; a row
    whose logits are all -inf takes the lowest id that is not suppressed."""
    x0 = gumbel_argmax(l, temperature, generator)
    return torch.where((l == NEG_INF).all(-1), first_allowed_id(suppress_ids), x0)


def confidence(l, x0, remasking, zero_confidence_ids=(), generator=None):
    """fp32 confidence of each position [B, L] (higher is committed first).

    low_confidence: softmax(l')[x0];  margin: top1 - top2 of softmax(l');
    entropy: sum p log p of softmax(l') (negative entropy);  random: u ~ U[0, 1) in fp32.
    l' is l with zero_confidence_ids at -inf. Where the softmax is undefined (a NaN or +inf in
    l', or no finite l') the formulas give NaN, which scores 0 (nan_to_num).
    """
    B, L, V = l.shape
    if remasking == "random":
        return torch.rand((B, L), dtype=torch.float32, device=l.device, generator=generator)
    p = torch.softmax(_fill_ids(l, zero_confidence_ids), dim=-1)
    if remasking == "low_confidence":
        c = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    elif remasking == "margin":
        top = p.topk(min(2, V), dim=-1).values
        c = top[..., 0] - (top[..., 1] if V > 1 else 0.0)
    elif remasking == "entropy":
        c = torch.special.xlogy(p, p).sum(-1)
    else:
        raise ValueError(f"unknown remasking {remasking!r}")
    return torch.nan_to_num(c, nan=0.0)


def select(conf, candidates, num_transfer, threshold=None):
    """Per row, the num_transfer[b] candidates of highest confidence (ties: lower position
    first), plus with a threshold every candidate whose fp32 confidence >= threshold.

    conf [B, L] fp32, candidates [B, L] bool, num_transfer [B] int64 -> transfer [B, L] bool.
    """
    B, L = conf.shape
    scored = torch.where(candidates, conf, NEG_INF)
    # A stable descending sort puts equal confidences in position order; rank[b, l] is l's place.
    order = torch.sort(scored, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(L, device=conf.device).expand(B, L))
    transfer = candidates & (rank < num_transfer.unsqueeze(-1))
    if threshold is not None:
        t = torch.tensor(threshold, dtype=torch.float32).item()  # compared in fp32
        transfer |= candidates & (conf >= t)
    return transfer


def edits(x0, conf, x, mask_id, edit_threshold, editable=None):
    """LLaDA2.1's token editing: [B, L] bool, the editable positions holding a committed token
    (x != mask_id; editable None: all of them) whose x0 differs from it with an fp32 confidence
    > edit_threshold (strictly, as LLaDA2.1 and diffusers' BlockRefinementScheduler). A
    confidence of 0 (undefined: non-finite logits) is never above a threshold >= 0."""
    t = torch.tensor(edit_threshold, dtype=torch.float32).item()  # compared in fp32
    edited = (x != mask_id) & (x0 != x) & (conf > t)
    return edited if editable is None else edited & editable


def remask_step(logits, x, num_transfer, *, mask_id=126336, block_end=None, temperature=0.0,
                remasking="low_confidence", threshold=None, uncond_logits=None, cfg_scale=0.0,
                suppress_ids=(), zero_confidence_ids=(), generator=None, edit_threshold=None,
                editable=None):
    """Shapes and meaning as llada_kernels.remask_step; num_transfer and block_end are [B]
    int64 tensors here (the public op expands ints). Returns (x_new, transfer).

    x0 and the confidence are computed at every position from one draw of noise, so a
    candidate and an edited position read the same step's noise, each its own."""
    B, L, _ = logits.shape
    l = _fill_ids(combined_logits(logits, uncond_logits, cfg_scale), suppress_ids)
    x0 = choose(l, temperature, suppress_ids, generator)
    conf = confidence(l, x0, remasking, list(suppress_ids) + list(zero_confidence_ids), generator)
    positions = torch.arange(L, device=x.device)
    candidates = (x == mask_id) & (positions < block_end.unsqueeze(-1))
    transfer = select(conf, candidates, num_transfer, threshold)
    if edit_threshold is not None:
        transfer = transfer | edits(x0, conf, x, mask_id, edit_threshold, editable)
    return torch.where(transfer, x0, x), transfer


def shard_stats(logits, x, block_end, *, mask_id, temperature, remasking, uncond_logits=None,
                cfg_scale=0.0, suppress_ids=(), zero_confidence_ids=(), generator=None,
                vocab_offset=0, vocab_size=None):
    """The statistics of llada::remask_step_stats (csrc/ops.cpp) on a vocabulary shard
    [B, L, V_r] of ids [vocab_offset, vocab_offset + V_r), in eager ops, with this file's
    random numbers: the float64 noise of the whole vocabulary ([B, L, vocab_size], drawn by
    every rank from the same generator state, so that id v's draw does not depend on the split),
    then the uniforms of "random" remasking. Returns stats [B, L, 4] float64 (y is the float64
    noisy value) and x0 [B, L] int64, at every position (the merge masks non-candidates)."""
    B, L, V = logits.shape
    lo, hi = vocab_offset, vocab_offset + V
    local = lambda ids: [i - lo for i in ids if lo <= i < hi]  # noqa: E731
    suppress = local(suppress_ids)
    l = _fill_ids(combined_logits(logits, uncond_logits, cfg_scale), suppress)
    values = l
    if temperature > 0:
        u = torch.rand((B, L, vocab_size), dtype=torch.float64, device=l.device,
                       generator=generator)[..., lo:hi]
        values = l.double() - temperature * torch.log(-torch.log(u))
    arg = values.argmax(-1)  # torch.argmax's order: NaN, then +inf, then the largest, lowest id
    y = values.gather(-1, arg[..., None])[..., 0].double()
    first = first_allowed_id(suppress_ids, lo)
    none = (l == NEG_INF).all(-1)
    x0 = torch.where(none, first - lo if first < hi else -1 - lo, arg) + lo
    y = torch.where(none, NEG_INF, y)

    z = _fill_ids(l, suppress + local(zero_confidence_ids))
    m = z.amax(-1)
    finite = torch.isfinite(m)
    e = torch.exp(z - torch.where(finite, m, 0)[..., None])
    s = torch.where(finite, e.sum(-1), 0)
    if remasking == "random":
        aux = torch.rand((B, L), dtype=torch.float32, device=l.device, generator=generator)
    elif remasking == "low_confidence":
        aux = torch.where(x0 >= 0, z.gather(-1, (x0 - lo).clamp_min(0)[..., None])[..., 0], NEG_INF)
    elif remasking == "margin":
        aux = z.topk(2, dim=-1).values[..., 1] if V > 1 else torch.full_like(m, NEG_INF)
    else:
        aux = torch.where(e > 0, e * (z - m[..., None]), 0).sum(-1)
    return torch.stack([y, m.double(), s.double(), aux.double()], -1), x0
