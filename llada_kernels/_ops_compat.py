"""Temporary indirection to the ops that are still being written on other branches.

The model, sampler and trainer call these three functions only. Each uses the public op when
the package has it (`llada_kernels.bidirectional_attention`,
`llada_kernels.fused_linear_masked_diffusion_loss`, `llada_kernels.masked_diffusion_loss`) and
otherwise an eager fallback with exactly the op's documented semantics. Delete this module and
call the ops directly once all three have merged.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import llada_kernels

from . import _backend


def attention(q, k, v, key_padding_mask=None, *, backend=None):
    """bidirectional_attention: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], key_padding_mask bool
    [B, Lk] (True = attend). Query rows whose keys are all padded give zeros."""
    if hasattr(llada_kernels, "bidirectional_attention"):
        return llada_kernels.bidirectional_attention(q, k, v, key_padding_mask, backend=backend)
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    any_key = key_padding_mask.any(-1)                                   # [B]
    mask = (key_padding_mask | ~any_key[:, None])[:, None, None, :]      # [B, 1, 1, Lk]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out * any_key[:, None, None, None].to(out.dtype)


def fused_linear_loss(hidden, weight, targets, masked, p_mask, *, bias=None, backend=None):
    """fused_linear_masked_diffusion_loss: sum over masked positions of
    CE(hidden @ weight.T + bias, target) / p_mask, fp32. hidden [B, L, D], weight [V, D]."""
    if hasattr(llada_kernels, "fused_linear_masked_diffusion_loss"):
        return llada_kernels.fused_linear_masked_diffusion_loss(
            hidden, weight, targets, masked, p_mask, bias=bias, backend=backend)
    p = p_mask if p_mask.dim() == 2 else p_mask[:, None].expand_as(masked)
    logits = F.linear(hidden[masked], weight, bias).float()             # [N, V]
    return (F.cross_entropy(logits, targets[masked], reduction="none") / p[masked].float()).sum()


def masked_loss(logits, targets, masked, p_mask, *, backend=None):
    """masked_diffusion_loss: the same sum from logits [B, L, V]."""
    if hasattr(llada_kernels, "masked_diffusion_loss"):
        return llada_kernels.masked_diffusion_loss(logits, targets, masked, p_mask, backend=backend)
    p = p_mask if p_mask.dim() == 2 else p_mask[:, None].expand_as(masked)
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    return (ce / p[masked].float()).sum()


def remask_backend(backend, device):
    """backend=None picks remask_step's device default; while this checkout has no compiled
    kernel for it (the C++ CPU kernel is landing), that default is the reference."""
    if backend is None and not os.environ.get(_backend.ENV_VAR) and _backend._unavailable(
            "remask_step", _backend.default_backend(device), device) is not None:
        return "reference"
    return backend
