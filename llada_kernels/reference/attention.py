"""Eager definition of bidirectional attention: the truth every bidirectional_attention
backend is tested against.

    out[b, h, i] = sum_j p[b, h, i, j] v[b, h // G, j],   G = Hq / Hkv
    p[b, h, i, :] = softmax_j(scale * q[b, h, i] . k[b, h // G, j]  +  (0 if mask[b, j] else -inf))

This is F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
enable_gqa=True) with one convention made explicit: a row whose keys are all padded has
p = 0, hence out = 0 and zero gradients (SDPA's math backend gives NaN or 0 depending on the
version). Everything runs in the inputs' dtype, as eager PyTorch would: run it on float64
inputs for the truth, on bf16 inputs for "eager PyTorch's error" in the tolerance rule.
"""

from __future__ import annotations

import math

import torch


def bidirectional_attention(q, k, v, key_padding_mask=None, scale=None, return_lse=False):
    """q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D], key_padding_mask [B, Lk] bool (True = attend)
    or None. Returns out [B, Hq, Lq, D], and with return_lse the fp32 log-sum-exp of each row's
    scaled scores [B, Hq, Lq] (+inf for a row with no key, as the kernels store it)."""
    B, Hq, Lq, D = q.shape
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale                                  # [B, Hq, Lq, Lk]
    if key_padding_mask is not None:
        has_key = key_padding_mask.any(-1)[:, None, None, None]            # [B, 1, 1, 1]
        # A row with no key attends everything, then is zeroed: no NaN, and zero gradients.
        attend = key_padding_mask[:, None, None, :] | ~has_key
        s = s.masked_fill(~attend, float("-inf"))
        p = torch.softmax(s, dim=-1) * has_key
    else:
        p = torch.softmax(s, dim=-1)
    out = p @ v
    if not return_lse:
        return out
    lse = torch.logsumexp(s.float(), dim=-1)
    if key_padding_mask is not None:
        lse = lse.masked_fill(~has_key[..., 0], float("inf"))
    return out, lse
