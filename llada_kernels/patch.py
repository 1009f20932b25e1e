"""Drop-ins for released model files: their attention runs on llada_kernels' op.

    patch_llada(model)   # a model built by LLaDA's modeling_llada.py (trust_remote_code)
    patch_llada2(model)  # LLaDA2.0/2.1's modeling_llada2_moe.py: structured masks, no L x L

The loss is swapped separately: `llada_kernels.training.hidden_and_head`, or `pretrain_loss` /
`sft_loss`, which accept the released model directly.
"""

from __future__ import annotations

import inspect
import sys
import types
import warnings
import weakref

import torch

from . import masks, ops
from .model import attention_backend


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
    if isinstance(key_mask, masks.AttentionMask):
        return ops.attention.attention(q, k, v, key_mask, backend=state.backend)
    return ops.attention.attention(q, k, v, key_padding_mask=key_mask, backend=state.backend)


def _warn_once(state, key, why):
    if key not in state.warned:
        state.warned.add(key)
        warnings.warn(f"patch_llada: a call ran on the model's original attention, not "
                      f"llada_kernels' op: {why}. Later calls for the same reason fall back "
                      "silently; patch_stats(model) counts them.", PatchFallbackWarning,
                      stacklevel=4)


def _key_mask(state, attn_mask, B, Lq, Lk):
    """(None, a [B, Lk] bool key mask or an AttentionMask; None) when the op can run, or
    (None, why not)."""
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
        return None, (f"an attention bias of shape {list(shape)} that is not key padding, "
                      "block-causal or the 2L block-diffusion mask (e.g. ALiBi or a sliding "
                      "window)")
    if isinstance(keep, masks.AttentionMask):
        return keep, None
    return keep.expand(B, Lk), None


def _one_value_per_row(m):
    """Whether each query row of a [B or 1, 1, Lq, Lk] bias adds one value to every key it
    attends (softmax drops it: the bias is a mask); always for a bool mask."""
    if m.dtype == torch.bool:
        return True
    bias = m[:, 0]
    keep = bias > torch.finfo(m.dtype).min / 2
    hi = bias.masked_fill(~keep, -float("inf")).amax(-1)
    lo = bias.masked_fill(~keep, float("inf")).amin(-1)
    return not bool(((hi != lo) & keep.any(-1)).any())


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
    result = None
    if _one_value_per_row(m):  # else not a mask at all (e.g. ALiBi)
        if not bool((keep != keep[:, :1]).any()):    # every query row the same: key padding
            result = keep[:, 0]
        elif m.shape[2] > 1:  # per-query rows: block-causal (causal) or the 2L mask, else None
            result = dense_to_structured(m)
    state.dense = (weakref.ref(source), source._version, view, result)
    return result


# ---- LLaDA2 ---------------------------------------------------------------------------------

IMPLEMENTATION = "llada_kernels"   # the name patch_llada2 registers with transformers


def patch_llada2(model, *, backend=None):
    """Run a LLaDA2.0/2.1 model (the HF `modeling_llada2_moe.py`, as inclusionAI and dllm
    ship it) on `llada_kernels.attention` with structured masks. In place; returns the model.

    Its forward then takes, as `attention_mask`, an llada_kernels.masks.AttentionMask (the
    block-causal mask of sampling, masks.block_causal; the 2L training mask over
    [x_t ; x_0], masks.block_diffusion): no [B, 1, L, L] mask is ever built, and every layer
    runs the op with tile skipping. Callers that build dense 4-D masks keep working: LLaDA2's
    own `generate` (a block-causal bf16 mask of 0 / -inf) and dFactory's trainer (the 2L
    float mask) pass them, and the patched forward reads each once, recognises a
    block-causal-like mask (every key seen by a suffix of the queries: block-causal, causal,
    full, with key padding) or the 2L mask, and hands the layers its O(L) description. A
    4-D mask it does not recognise, a 2-D mask (the file turns it into a causal 4-D mask),
    attention dropout in training or a sliding window run the model's original attention,
    unchanged: correct, not accelerated. No mask is bidirectional attention, as the file's
    SDPA path does.

    How: the model's attention implementation is set to a function registered with
    transformers' AttentionInterface as "llada_kernels", and the inner model's forward is
    wrapped to turn the mask into a small 4-D carrier tensor that the file passes to every
    layer unchanged (so gradient checkpointing's recomputation sees the same mask).
    `llada_kernels.block_generate.block_generate` and `training.block_diffusion_loss` accept
    the patched model.
    """
    from transformers import AttentionInterface

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "attention") for layer in layers) \
            or not hasattr(getattr(model, "config", None), "_attn_implementation"):
        raise TypeError(f"patch_llada2: {type(model).__name__} is not a model built by LLaDA2's "
                        "modeling_llada2_moe.py (no .model.layers[i].attention)")
    AttentionInterface.register(IMPLEMENTATION, _llada2_attention)
    config = model.config
    if config._attn_implementation != IMPLEMENTATION:
        inner._llada_original_attention = config._attn_implementation or "eager"
        config._attn_implementation = IMPLEMENTATION
    # The file's SDPA branch passes a 4-D mask through unchanged (its eager branch rewrites
    # it); masks of the other branches are rebuilt below anyway.
    inner._use_sdpa, inner._use_flex_attention = True, False
    if getattr(inner, "_llada_original_forward", None) is None:
        inner._llada_original_forward = inner.forward
        inner.forward = types.MethodType(_llada2_forward, inner)
    for layer in layers:
        layer.attention._llada_backend = backend
        layer.attention._llada_original_attention = inner._llada_original_attention
    model._llada2_patched = True
    return model


def _llada2_forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
    """The inner model's forward with attention_mask an AttentionMask or a recognised dense
    4-D mask replaced by a carrier the layers read."""
    if isinstance(attention_mask, masks.AttentionMask):
        attention_mask = _carrier(attention_mask, input_ids, kwargs)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        structured = dense_to_structured(attention_mask)
        if structured is not None:
            attention_mask = _carrier(structured, input_ids, kwargs)
    return self._llada_original_forward(input_ids, attention_mask, *args, **kwargs)


def _carrier(mask, input_ids, kwargs):
    ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    carrier = torch.zeros((1, 1, 1, 1), device=ref.device)
    carrier.llada_mask = mask
    return carrier


def _llada2_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, **kwargs):
    """transformers' attention interface: query [B, H, Lq, D], key/value [B, Hkv, Lk, D]
    (after the KV cache) -> ([B, Lq, H, D], None)."""
    mask = getattr(attention_mask, "llada_mask", None) if attention_mask is not None else None
    windowed = sliding_window is not None and getattr(module.config, "use_sliding_window", False)
    if (attention_mask is not None and mask is None) or dropout > 0 or windowed:
        return _original_attention(module)(module, query, key, value, attention_mask,
                                           dropout=dropout, scaling=scaling,
                                           sliding_window=sliding_window, **kwargs)
    backend = attention_backend(getattr(module, "_llada_backend", None), mask, query.device)
    out = ops.attention.attention(query, key, value, mask, scale=scaling, backend=backend)
    return out.transpose(1, 2).contiguous(), None


def _original_attention(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = getattr(module, "_llada_original_attention", "eager")
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def dense_to_structured(mask: torch.Tensor) -> masks.AttentionMask | None:
    """The AttentionMask equal to a dense [B or 1, 1, Lq, Lk] mask (bool True = attend, or
    float: > finfo.min / 2 attends), when it is block-causal-like (each key seen by a suffix
    of the queries, queries counted from the top: block-causal, causal, full, with key
    padding) or the 2L block-diffusion mask; else None. Reads the mask once (O(Lq Lk))."""
    if mask.shape[1] != 1:
        return None
    see = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    B, Lq, Lk = see.shape
    # Suffix form: key j is seen by queries i >= first(j) (never seen: lo > every level).
    seen = see.any(1)                                                          # [B, Lk]
    first = torch.where(seen, see.int().argmax(1), masks.INF).to(torch.int32)   # [B, Lk]
    levels = torch.arange(Lq, dtype=torch.int32, device=see.device)
    if torch.equal(levels[None, :, None] >= first[:, None, :], see):
        q_mask = torch.stack([torch.zeros_like(levels), levels])[None].expand(B, -1, -1)
        k_mask = torch.stack([torch.zeros_like(first), first, torch.full_like(first, masks.INF)], 1)
        return masks.AttentionMask(q_mask.contiguous(), k_mask.contiguous(), "block_causal")
    # The 2L mask: noisy query 0 sees exactly the b keys of noisy block 0.
    if Lq == Lk and Lq % 2 == 0:
        b = int(see[0, 0].sum())
        if b >= 1:
            candidate = masks.block_diffusion(b, Lq // 2, device=see.device)
            if torch.equal(candidate.to_dense().expand(B, -1, -1), see):
                return candidate
    return None
