"""Other projects' GPU kernels that the benchmarks compare against, each used only where it
imports (none is a dependency of this project):

    attention   sdpa_cudnn   F.scaled_dot_product_attention forced onto cuDNN's backend
                flex         FlexAttention (torch.nn.attention.flex_attention, compiled), the
                             key padding as a BlockMask
                flash_attn   flash-attn 2's flash_attn_func (takes no padding mask)
    fused loss  liger        Liger Kernel's fused linear cross-entropy
                cut_cross_entropy   Apple's Cut Cross-Entropy (linear_cross_entropy)

The fused-loss peers compute per-token cross-entropy of the masked rows (reduction "none"),
which is then divided by p_mask and summed: the same value as our loss, the same work.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---- attention: fn(q, k, v, key_padding_mask or None) -> out ------------------------------

def _sdpa_cudnn(q, k, v, mask):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])


@functools.cache
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def _flex_block_mask(mask_key, B, Lq, Lk, device):
    from torch.nn.attention.flex_attention import create_block_mask

    mask = _FLEX_MASKS[mask_key]
    return create_block_mask(lambda b, h, q_idx, kv_idx: mask[b, kv_idx], B, None, Lq, Lk,
                             device=device)


_FLEX_MASKS: dict[int, torch.Tensor] = {}


def _flex(q, k, v, mask):
    block_mask = None
    if mask is not None:  # built once per mask tensor, outside the timed calls after the first
        _FLEX_MASKS[id(mask)] = mask
        block_mask = _flex_block_mask(id(mask), q.shape[0], q.shape[2], k.shape[2], str(q.device))
    return _flex_compiled()(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _flash_attn(q, k, v, mask):
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


ATTENTION = {"sdpa_cudnn": _sdpa_cudnn, "flex": _flex, "flash_attn": _flash_attn}
ATTENTION_NO_MASK = {"flash_attn"}  # run unpadded only


def attention_peers() -> list[str]:
    """The attention peers that import here (CUDA)."""
    out = ["sdpa_cudnn"]
    if importable("torch.nn.attention.flex_attention"):
        out.append("flex")
    if importable("flash_attn"):
        out.append("flash_attn")
    return out


# ---- the fused linear loss: fn(hidden [N, D], weight [V, D], targets [N], p [N]) -> loss ----

def _liger(hidden, weight, targets, p):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    ce = liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")
    return (ce / p).sum()


def _cut_cross_entropy(hidden, weight, targets, p):
    from cut_cross_entropy import linear_cross_entropy

    ce = linear_cross_entropy(hidden, weight, targets, reduction="none")
    return (ce / p).sum()


FUSED_LOSS = {"liger": _liger, "cut_cross_entropy": _cut_cross_entropy}


def fused_loss_peers() -> list[str]:
    """The fused-loss peers that import here (CUDA)."""
    return [name for name, module in (("liger", "liger_kernel"),
                                      ("cut_cross_entropy", "cut_cross_entropy"))
            if importable(module)]


def fused_loss_step(provider, hidden, weight, ids, masked, p_mask):
    """One forward of a fused-loss peer on the masked rows of [B, L, D] hidden states."""
    p = p_mask if p_mask.dim() == 2 else p_mask[:, None].expand_as(masked)  # [B] or [B, L]
    return FUSED_LOSS[provider](hidden[masked], weight, ids[masked], p[masked].float())
