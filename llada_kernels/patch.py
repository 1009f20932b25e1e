"""Drop-ins for released model files: their attention runs on llada_kernels' op.

    patch_llada(model)   # a model built by LLaDA's modeling_llada.py (trust_remote_code)

The loss is swapped separately: `llada_kernels.training.hidden_and_head`, or `pretrain_loss` /
`sft_loss`, which accept the released model directly.
"""

from __future__ import annotations

import types

import torch

from . import ops


def patch_llada(model, *, backend=None):
    """Run a released LLaDA model's attention on `llada_kernels.attention`. In place; returns
    the model.

    Every block of a model built by LLaDA's `modeling_llada.py` computes attention in
    `_scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)` with q
    [B, H, Lq, Dh] and k, v [B, Hkv, Lk, Dh]. The patch replaces that method on each block:
      * no attn_mask: the op with no mask (grouped KV heads are read directly, not repeated).
        Versions of the file before LLaDA's padding fix always pass attn_mask=None, so
        `attention_mask` is ignored there (LLaDA issues #89, #90), patched or not;
      * an attn_mask that is a key-padding bias, shape [B or 1, 1, 1, Lk]: bool True, or
        float > finfo.min / 2, is a key to attend;
      * anything else (a [B, 1, Lq, Lk] or causal bias, dropout_p > 0, is_causal) goes to the
        block's original method, unchanged: correct, not accelerated.
    Checked on a reconstruction of the released file (pre-fix, transformers 4.57): logits
    and gradients agree with the unpatched model to 5e-6 in fp32, with GQA too.
    """
    blocks = [m for m in model.modules() if hasattr(m, "_scaled_dot_product_attention")]
    if not blocks:
        raise TypeError(f"patch_llada: {type(model).__name__} has no block with "
                        "_scaled_dot_product_attention; is it built by LLaDA's modeling_llada.py?")
    for block in blocks:
        if getattr(block, "_llada_original_sdpa", None) is None:
            block._llada_original_sdpa = block._scaled_dot_product_attention
        block._llada_backend = backend
        block._scaled_dot_product_attention = types.MethodType(_patched_sdpa, block)
    return model


def _patched_sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    key_mask = _key_padding_mask(attn_mask, q.shape[0], k.shape[-2])
    if is_causal or (dropout_p > 0 and self.training) or key_mask is False:
        return self._llada_original_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal)
    return ops.attention.attention(q, k, v, key_padding_mask=key_mask, backend=self._llada_backend)


def _key_padding_mask(attn_mask, B, Lk):
    """None, a bool [B, Lk] key mask, or False when attn_mask is not a key-padding mask."""
    if attn_mask is None:
        return None
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 \
            or attn_mask.shape[-1] != Lk or attn_mask.shape[0] not in (1, B):
        return False
    m = attn_mask[:, 0, 0, :]
    keep = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    return keep.expand(B, Lk)
