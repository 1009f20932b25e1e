"""Eager definition of attention with a structured mask: the truth every `attention` backend
is tested against.

    out[b, h, i] = sum_j p[b, h, i, j] v[b, h // G, j],   G = Hq / Hkv
    p[b, h, i, :] = softmax_j(scale * q[b, h, i] . k[b, h // G, j]  +  (0 if mask[b, i, j] else -inf))

with the dense boolean mask built from the O(L) description of llada_kernels/masks.py:

    mask[b, i, j] = qdoc(i) == kdoc(j)  and  lo(j) <= level(i) <= hi(j)

This is F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
with one convention made explicit: a row that sees no key has p = 0, hence out = 0 and zero
gradients (SDPA's math backend gives NaN or 0 depending on the version). Everything runs in
the inputs' dtype, as eager PyTorch would: run it on float64 inputs for the truth, on bf16
inputs for "eager PyTorch's error" in the tolerance rule.
"""

from __future__ import annotations

import math

import torch


def dense_mask(q_mask: torch.Tensor, k_mask: torch.Tensor) -> torch.Tensor:
    """q_mask [B, 2, Lq] (qdoc, level), k_mask [B, 3, Lk] (kdoc, lo, hi), int32 -> the
    [B, Lq, Lk] bool mask they describe (B broadcasts when one of them has B = 1)."""
    qdoc, level = q_mask[:, 0, :, None], q_mask[:, 1, :, None]                       # [B, Lq, 1]
    kdoc, lo, hi = k_mask[:, 0, None, :], k_mask[:, 1, None, :], k_mask[:, 2, None, :]  # [B, 1, Lk]
    return (qdoc == kdoc) & (lo <= level) & (level <= hi)


def attention(q, k, v, mask=None, scale=None, return_lse=False):
    """q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], mask [B, Lq, Lk] bool (True = attend; B may
    be 1) or None. Returns out [B, Hq, Lq, D], and with return_lse the fp32 log-sum-exp of
    each row's scaled, visible scores [B, Hq, Lq] (+inf for a row that sees no key, as the
    kernels store it)."""
    D = q.shape[-1]
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale                                  # [B, Hq, Lq, Lk]
    if mask is not None:
        mask = mask[:, None]                                               # [B, 1, Lq, Lk]
        has_key = mask.any(-1, keepdim=True)                               # [B, 1, Lq, 1]
        # A row with no key attends everything, then is zeroed: no NaN, and zero gradients.
        s = s.masked_fill(~(mask | ~has_key), float("-inf"))
        p = torch.softmax(s, dim=-1) * has_key
    else:
        p = torch.softmax(s, dim=-1)
    out = p @ v
    if not return_lse:
        return out
    lse = torch.logsumexp(s.float(), dim=-1)
    if mask is not None:
        lse = lse.masked_fill(~has_key[..., 0], float("inf"))
    return out, lse


def bidirectional_attention(q, k, v, key_padding_mask=None, scale=None, return_lse=False):
    """attention() with a key-padding mask [B, Lk] bool (True = attend) or None."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, :]  # [B, 1, Lk]
    if mask is not None:
        mask = mask.expand(-1, q.shape[2], -1)
    return attention(q, k, v, mask, scale, return_lse)
