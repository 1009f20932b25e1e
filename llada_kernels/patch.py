"""Drop-ins for released model files: their attention runs on llada_kernels' op.

    patch_llada(model)   # a model built by LLaDA's modeling_llada.py (trust_remote_code)

The loss is swapped separately: `llada_kernels.training.hidden_and_head`, or `pretrain_loss` /
`sft_loss`, which accept the released model directly.
"""

from __future__ import annotations

import inspect
import types
import warnings
import weakref

import torch

from . import ops


class PatchFallbackWarning(UserWarning):
    """A patched model ran a call on its original attention (correct, not accelerated)."""


def patch_llada(model, *, backend=None):
    """Run a released LLaDA model's attention on `llada_kernels.attention`. In place; returns
    the model.

    Every block of a model built by LLaDA's `modeling_llada.py` computes attention in
    `_scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)` with q
    [B, H, Lq, Dh] and k, v [B, Hkv, Lk, Dh]. The patch replaces that method on each block:
      * no attn_mask: the op with no mask (grouped KV heads are read directly, not repeated).
        Versions of the file before LLaDA's padding fix always pass attn_mask=None, so
        `attention_mask` is ignored there (LLaDA issues #89, #90), patched or not;
      * a padded batch: the released file turns `attention_mask` [B, L] into a [B, 1, L, L]
        additive bias (0 where a key is attended, finfo.min where it is padding) and hands it
        to every block. The patch wraps the inner model's forward, so it takes the key mask
        straight from `attention_mask` (attention_mask != 0, once per forward, O(B L)) and
        never reads the [B, 1, L, L] bias;
      * any other bias (a user's `attention_bias`, or a call outside the model's forward, as
        in activation checkpointing's recomputation) is read once per bias tensor: a bias of
        shape [B or 1, 1, Lq or 1, Lk] whose every query row is the same key mask (bool True,
        or float > finfo.min / 2 attends, all attended keys of a row with one value) runs the
        op with that key mask;
      * anything else (a causal or ALiBi bias, block masks, dropout_p > 0 in training,
        is_causal) goes to the block's original method, unchanged: correct, not accelerated,
        with one PatchFallbackWarning per model and reason.
    `patch_stats(model)` counts the calls of each kind. Checked against the released
    architecture's file (dllm's copy, transformers 4.57): logits and gradients agree with the
    unpatched model, with key padding too (tests/test_patch_llada.py).
    """
    blocks = [m for m in model.modules() if hasattr(m, "_scaled_dot_product_attention")]
    if not blocks:
        raise TypeError(f"patch_llada: {type(model).__name__} has no block with "
                        "_scaled_dot_product_attention; is it built by LLaDA's modeling_llada.py?")
    inner = _inner_model(model)
    state = getattr(inner, "_llada_patch", None) if inner is not None else None
    if state is None:
        state = _PatchState()
    state.backend = backend
    if inner is not None and getattr(inner, "_llada_original_forward", None) is None:
        inner._llada_patch = state
        inner._llada_original_forward = inner.forward
        inner._llada_forward_signature = inspect.signature(inner.forward)
        inner.forward = types.MethodType(_llada_forward, inner)
    for block in blocks:
        if getattr(block, "_llada_original_sdpa", None) is None:
            block._llada_original_sdpa = block._scaled_dot_product_attention
        block._llada_patch = state
        block._scaled_dot_product_attention = types.MethodType(_patched_sdpa, block)
    model._llada_patch = state
    return model


def patch_stats(model) -> dict[str, int]:
    """{"op": calls run on llada_kernels.attention, "original": calls handed to the original
    attention} since the model was patched."""
    state = getattr(model, "_llada_patch", None)
    if state is None:
        raise TypeError(f"patch_stats: {type(model).__name__} was not patched by patch_llada")
    return dict(state.calls)


class _PatchState:
    """What the blocks of one patched model share (a plain object, not a Module)."""

    def __init__(self):
        self.backend = None
        self.calls = {"op": 0, "original": 0}
        self.warned: set[str] = set()
        self.forward_key_mask = None   # (B, L, [B, L] bool) inside a forward with a padded batch
        self.dense = None              # (weakref to a bias tensor, version, view, key mask | None)


def _inner_model(model):
    """The module of the released file that builds the attention bias (LLaDAModel: it has
    .transformer.blocks), or None."""
    for m in model.modules():
        t = getattr(m, "transformer", None)
        if t is not None and (hasattr(t, "blocks") or hasattr(t, "block_groups")):
            return m
    return None


def _llada_forward(self, *args, **kwargs):
    """The released LLaDAModel.forward, with the key mask of a padded batch taken from its
    `attention_mask` for the blocks (the bias the file builds from it is then never read)."""
    state = self._llada_patch
    try:
        bound = self._llada_forward_signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = {}
    state.forward_key_mask = _forward_key_mask(bound)
    try:
        return self._llada_original_forward(*args, **kwargs)
    finally:
        state.forward_key_mask = None


def _forward_key_mask(arguments):
    """(B, L, [B, L] bool) when the file's bias will be exactly the key padding of
    attention_mask (no attention_bias, no past keys, a 0/1 mask), else None. One host sync,
    as the file's own `0.0 in attention_mask`."""
    am = arguments.get("attention_mask")
    if am is None or arguments.get("attention_bias") is not None \
            or arguments.get("past_key_values") is not None \
            or not isinstance(am, torch.Tensor) or am.dim() != 2:
        return None
    keep = am != 0
    if not bool(((am == 1) | ~keep).all()):
        return None
    return am.shape[0], am.shape[1], keep


def _patched_sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    state = self._llada_patch
    key_mask, why = _key_mask(state, attn_mask, q.shape[0], q.shape[-2], k.shape[-2])
    if is_causal:
        why = "is_causal=True (a causal mask; LLaDA's attention is bidirectional)"
    elif dropout_p > 0 and self.training:
        why = (f"attention dropout {dropout_p} in training (the op has no dropout; LLaDA trains "
               "with attention_dropout = 0)")
    if why is not None:
        state.calls["original"] += 1
        _warn_once(state, why.split(" (")[0], why)
        return self._llada_original_sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal)
    state.calls["op"] += 1
    return ops.attention.attention(q, k, v, key_padding_mask=key_mask, backend=state.backend)


def _warn_once(state, key, why):
    if key not in state.warned:
        state.warned.add(key)
        warnings.warn(f"patch_llada: a call ran on the model's original attention, not "
                      f"llada_kernels' op: {why}. Later calls for the same reason fall back "
                      "silently; patch_stats(model) counts them.", PatchFallbackWarning,
                      stacklevel=4)


def _key_mask(state, attn_mask, B, Lq, Lk):
    """(None or a [B, Lk] bool key mask, None) when the op can run, or (None, why not)."""
    if attn_mask is None:
        return None, None
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() != 4 or shape[1] != 1 or shape[0] not in (1, B) \
            or shape[2] not in (1, Lq) or shape[3] != Lk:
        return None, f"an attention bias of shape {list(shape)} (not [B or 1, 1, Lq or 1, Lk])"
    fk = state.forward_key_mask
    if fk is not None and shape[2] == Lq == Lk == fk[1] and fk[0] == B and shape[0] == B:
        return fk[2], None                  # the file's bias of this forward's attention_mask
    keep = _dense_key_mask(state, attn_mask)
    if keep is None:
        return None, (f"an attention bias of shape {list(shape)} that is not key padding "
                      "(e.g. causal, ALiBi or block masks)")
    return keep.expand(B, Lk), None


def _dense_key_mask(state, m):
    """The [B or 1, Lk] key mask of a [B or 1, 1, Lq or 1, Lk] bias whose query rows all
    equal one key mask (bool True, or float > finfo.min / 2 attends, with one value for all
    the attended keys of a row: the released file turns a bool bias into 1.0 / finfo.min),
    else None. Read once per bias tensor: the blocks of one forward get views of one tensor
    (fp32), and the last answer is kept for it while its version counter is unchanged."""
    source = m._base if m._base is not None else m
    view = (m.storage_offset(), tuple(m.shape), m.stride(), m.dtype)
    cached = state.dense
    if cached is not None and cached[0]() is source and cached[1] == source._version \
            and cached[2] == view:
        return cached[3]
    keep = m[:, 0] if m.dtype == torch.bool else m[:, 0] > torch.finfo(m.dtype).min / 2
    bad = (keep != keep[:, :1]).any()                         # rows differ: not key padding
    if m.dtype != torch.bool:  # the attended keys of a row must share one value (softmax drops it)
        hi = m[:, 0].masked_fill(~keep, -float("inf")).amax(-1)
        lo = m[:, 0].masked_fill(~keep, float("inf")).amin(-1)
        bad |= ((hi != lo) & keep.any(-1)).any()
    result = None if bool(bad) else keep[:, 0]
    state.dense = (weakref.ref(source), source._version, view, result)
    return result
