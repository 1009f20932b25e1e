"""Vocabulary-parallel remask_step: each rank holds the logits of ids [offset, offset + V_r);
the ranks exchange O(B x L) statistics and every rank makes the same step.

Per position, rank i runs the single-device kernel in stats mode (llada::remask_step_stats:
remask_step's pass over the shard, stopped before the selection; csrc/ops.cpp states the
fields) and gets its shard's choice x0_i with its value y_i, and (m_i, s_i, aux_i) for the
confidence. One all-gather of [B * L, 6] 32-bit words (4 floats and the int64 x0), then on
every rank, in the same order:

    x0 = the lowest x0_i with y_i NaN, else with y_i = +inf, else the largest finite y_i (ties:
         the lowest id), else the lowest x0_i >= 0 (every logit -inf: the lowest allowed id)
    M  = max_i m_i,  S = sum_i s_i e^(m_i - M),  and per mode, with o the shard holding x0:
         low_confidence  e^(aux_o - M) / S
         margin          (1 - e^(M2 - M)) / S,  M2 the second largest of all {m_i, aux_i}
         entropy         T / S - log S,  T = sum_i e^(m_i - M) (aux_i + (m_i - M) s_i)
         random          aux (the same on every rank)
    and 0 where a shard holds a NaN or +inf confidence logit, none is finite, or the formula
    is NaN; then the selection of llada_kernels/reference/remask.py (k per row by confidence,
    ties by position, the threshold).

Token editing (edit_threshold): the positions it may change are scored in the same stats pass
as the candidates (the kernels are asked for the statistics of candidates | editable, with
block_end = L), and each is edited by the reference's rule on the merged choice and confidence.

The noise of id v is keyed by (seed, position, v), so the choice is exactly the single-process
kernel's when every rank draws the same seed (the same generator state: the op draws the seed
from `generator` on every rank). The confidences are sums in another order: equal to the
single-process ones to fp32 rounding, so the selection can differ only where two candidates'
confidences (or one and the threshold) lie within that rounding.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..reference import remask as reference
from . import _exchange

INT64_MAX = 2**63 - 1
NEG_INF = float("-inf")


def remask_step(logits, x, num_transfer, block_end, *, mask_id, temperature, remasking,
                threshold, uncond_logits, cfg_scale, suppress_ids, zero_confidence_ids,
                generator, backend, group, offset, op, edit_threshold=None, editable=None):
    """llada_kernels.remask_step on a shard (arguments checked there, but for the ids, which
    are checked here against the whole vocabulary: that takes the layout's collective)."""
    B, L, V = logits.shape
    total = None
    if _checks.values_checked() or (backend == "reference" and temperature > 0):
        total = _exchange.layout(op, group, offset, V, B * L, logits.device).total
        _checks.check_int(op, "mask_id", mask_id, 0, total - 1)
        for name, ids in (("suppress_ids", suppress_ids), ("zero_confidence_ids", zero_confidence_ids)):
            _checks.check_ids(op, name, ids, total)
        if len(set(suppress_ids)) == total:
            _checks.fail(op, f"suppress_ids covers the whole vocabulary (V={total}); nothing can be chosen")
    args = dict(mask_id=mask_id, temperature=temperature, remasking=remasking,
                suppress_ids=suppress_ids, zero_confidence_ids=zero_confidence_ids)
    candidates = (x == mask_id) & (torch.arange(L, device=x.device) < block_end[:, None])
    scored, scored_end = x, block_end
    if edit_threshold is not None:  # score candidates and editable committed positions alike
        to_edit = (x != mask_id) if editable is None else (x != mask_id) & editable
        scored = torch.where(candidates | to_edit, mask_id, -1)  # -1: no id, never mask_id
        scored_end = torch.full_like(block_end, L)
    if backend == "reference":
        stats, x0 = reference.shard_stats(logits, scored, scored_end, uncond_logits=uncond_logits,
                                          cfg_scale=cfg_scale, generator=generator,
                                          vocab_offset=offset, vocab_size=total, **args)
    else:
        seed = None
        if temperature > 0 or remasking == "random":  # as the single-device op draws it
            seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=logits.device,
                                 generator=generator)
        stats_op = (torch.ops.llada.remask_step_stats_triton if backend == "triton"
                    else torch.ops.llada.remask_step_stats)
        un = None if uncond_logits is None else _checks.unit_stride(uncond_logits)
        stats, x0 = stats_op(_checks.unit_stride(logits), un, cfg_scale, scored, scored_end,
                             mask_id, temperature, remasking, suppress_ids, zero_confidence_ids,
                             seed, offset)
    packed = _exchange.pack(stats.reshape(B * L, 4), x0.reshape(B * L, 1))
    gathered_stats, gathered_x0 = _exchange.unpack(_exchange.all_gather(packed, group),
                                                   (stats.dtype, 4), (torch.int64, 1))
    choice, conf = merge(gathered_stats, gathered_x0[..., 0], remasking)
    transfer = reference.select(conf.view(B, L), candidates, num_transfer, threshold)
    if edit_threshold is not None:
        transfer = transfer | reference.edits(choice.view(B, L), conf.view(B, L), x, mask_id,
                                              edit_threshold, editable)
    return torch.where(transfer, choice.view(B, L), x), transfer


def merge(stats, x0, remasking):
    """stats [W, N, 4] and x0 [W, N] of every shard (llada::remask_step_stats) -> the choice
    [N] int64 and the fp32 confidence [N] of the whole vocabulary (module docstring)."""
    y, m, s, aux = stats.unbind(-1)

    def lowest(where):
        return torch.where(where, x0, INT64_MAX).amin(0)

    finite = torch.isfinite(y)
    best = torch.where(finite, y, NEG_INF).amax(0)
    nan, inf = torch.isnan(y), y == float("inf")
    choice = torch.where(nan.any(0), lowest(nan), torch.where(
        inf.any(0), lowest(inf), torch.where(
            finite.any(0), lowest(finite & (y == best)), lowest(x0 >= 0))))

    m, s, aux = m.float(), s.float(), aux.float()
    if remasking == "random":
        return choice, aux[0] + 0.0
    broken = (torch.isnan(m) | (m == float("inf")) | torch.isnan(s)).any(0)
    M = torch.where(torch.isnan(m), NEG_INF, m).amax(0)
    ok = ~broken & (M > NEG_INF)
    M = torch.where(ok, M, 0)
    scale = torch.exp(m - M)  # 0 for a shard without a finite confidence logit (m = -inf)
    S = torch.where(ok, (s * scale).sum(0), 1)
    if remasking == "low_confidence":
        owner = (x0 == choice).to(torch.int8).argmax(0)
        c = torch.exp(aux.gather(0, owner[None])[0] - M) / S
    elif remasking == "margin":
        M2 = torch.cat([m, aux]).topk(2, dim=0).values[1]
        c = 1.0 / S - torch.exp(M2 - M) / S
    else:  # entropy
        T = torch.where(s > 0, scale * (aux + (m - M) * s), 0).sum(0)
        c = T / S - torch.log(S)
    return choice, torch.where(ok & ~torch.isnan(c), c, 0) + 0.0
