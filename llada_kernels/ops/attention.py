"""attention: fused attention with structured masks (key padding, block-causal, packed
documents, the 2L block-diffusion mask) and grouped KV heads. `bidirectional_attention` is
its deprecated former name."""

from __future__ import annotations

import math
import warnings

import torch

from .. import _backend, _checks, masks
from ..reference import attention as reference

OP = "attention"
KERNEL = "attention_fwd"  # the schema whose kernels _backend looks up

# What each compiled backend runs: (dtypes, head dims). The reference runs anything.
SUPPORTED = {
    "cpu": (_checks.FLOAT_DTYPES, range(1, 257)),
    "triton": ((torch.bfloat16, torch.float16), (16, 32, 64, 128)),
    "cuda": ((torch.bfloat16, torch.float16), (64, 128)),
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: masks.AttentionMask | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    q_offset: int | torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with a structured mask and grouped KV heads:

        out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j]) v[b, h // G, j]

    over the keys j that query i sees, G = Hq / Hkv. With no mask, every query sees every key
    (LLaDA's bidirectional mask predictor). It equals F.scaled_dot_product_attention(q, k, v,
    attn_mask=mask.to_dense()[:, None], scale=scale, enable_gqa=True), except that a query
    that sees no key returns zeros (and gets zero gradients), never NaN. Differentiable in q,
    k and v; the compiled backends never build an Lq x Lk matrix (online softmax, backward
    recomputed from a saved log-sum-exp), and (query tile, key tile) pairs that the mask
    removes are never computed, forward or backward.

    The mask is either `mask`, an AttentionMask from llada_kernels.masks (build it once per
    forward and pass it to every layer, as with FlexAttention's BlockMask; the 2L
    block-diffusion training mask is `masks.block_diffusion`), or these keywords, which build
    one on every call (masks.block_causal / masks.documents / masks.key_padding):
        key_padding_mask  [B, Lk] bool, True = attend (HF attention_mask). Also combines with
                          `mask`.
        block_size        block-causal: the query at position i sees the key at position j iff
                          j // block_size <= i // block_size.
        q_offset, q_positions
                          where the queries stand among the keys when Lq < Lk (a KV cache):
                          query i is key q_offset + i (int or [B]; default Lk - Lq, the last
                          Lq keys), or key q_positions[b, i] ([B, Lq] or [Lq]).
        cu_seqlens        packed documents, flash-attn varlen style: [N + 1] cumulative
                          lengths over the flattened batch (0, ..., B * Lk).
        document_ids      packed documents, FlexAttention style: [B, Lk] or [Lk] ids.
    Blocks restart at each document start (see llada_kernels.masks for the conventions).

    Args:
        q: [B, Hq, Lq, D] (SDPA layout). Any strides; a non-unit stride along D costs a copy.
        k: [B, Hkv, Lk, D], same dtype and device as q; Hq must be a multiple of Hkv.
        v: [B, Hkv, Lk, D], same dtype and device as q.
        mask: an AttentionMask with q_mask [B or 1, 2, Lq] and k_mask [B or 1, 3, Lk], or None.
        scale: softmax scale; defaults to 1 / sqrt(D).
        backend: "reference", "cpu", "triton" or "cuda"; see llada_kernels._backend.
            cpu: float32, bfloat16, float16, D <= 256. triton: bfloat16, float16,
            D in {16, 32, 64, 128}. cuda: bfloat16, float16, D in {64, 128}.
        return_lse: also return each row's log-sum-exp, for merging partial results over key
            chunks (context parallelism: `merge_attention`).

    Returns:
        out: [B, Hq, Lq, D], q's dtype, contiguous. Accumulation is in fp32.
        lse (with return_lse): [B, Hq, Lq] fp32, log sum_j exp(scale * q_i . k_j) over the
            keys row i sees (natural log, as flash-attn's softmax_lse); -inf for a row that
            sees no key (log 0, so that merging treats it as an empty part). Differentiable:
            its gradient reaches q and k in the same backward pass (no extra kernel).
    """
    B, Hq, Lq, D, Hkv, Lk = _check(q, k, v)
    # An AttentionMask, None (every key), or the [B, Lk] key padding alone (the common case
    # of LLaDA 1, kept as a tensor: no description is built unless a kernel needs one).
    mask = _mask(mask, B, Lq, Lk, q.device, key_padding_mask, block_size, q_offset, q_positions,
                 cu_seqlens, document_ids)
    name = _backend.resolve(KERNEL, backend, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        _checks.fail(OP, f"scale must be finite; got {scale}")
    if name == "reference":
        dense = mask[:, None, :].expand(B, Lq, Lk) if isinstance(mask, torch.Tensor) \
            else None if mask is None else mask.to_dense()
        if not return_lse:
            return reference.attention(q, k, v, dense, scale)
        out, lse = reference.attention(q, k, v, dense, scale, return_lse=True)
        return out, _public_lse(lse)

    dtypes, head_dims = SUPPORTED[name]
    _checks.check_in(OP, "q.dtype", q.dtype, dtypes, f" on the {name} backend")
    _checks.check_in(OP, "the head dimension D", D, head_dims, f" on the {name} backend")
    q, k, v = _checks.unit_stride(q), _checks.unit_stride(k), _checks.unit_stride(v)
    if isinstance(mask, torch.Tensor):
        q_mask, k_mask = masks.key_padding_tensors(mask, Lq)
    else:
        q_mask, k_mask = (None, None) if mask is None else mask.tensors(B)
    fwd = torch.ops.llada.attention_fwd_triton if name == "triton" else torch.ops.llada.attention_fwd
    out, lse = fwd(q, k, v, q_mask, k_mask, scale)
    return (out, _public_lse(lse)) if return_lse else out


def _public_lse(lse: torch.Tensor) -> torch.Tensor:
    """The kernels' lse [B, Hq, Lq] (+inf where a row sees no key, so that exp(s - lse) = 0 in
    their backward) -> the returned one (-inf there: log of an empty sum)."""
    return lse.masked_fill(lse == float("inf"), float("-inf"))


def merge_attention(outs, lses):
    """Merge attention over disjoint key chunks (context parallelism, ring attention): with
    out_c, lse_c = attention(q, k_c, v_c, ..., return_lse=True) for chunks k_c, v_c that
    partition the keys (each call masked as the whole would be: same q positions, the chunk's
    part of the mask), the full result is

        lse = log sum_c exp(lse_c),   out = sum_c exp(lse_c - lse) out_c.

    Args:
        outs: a sequence of [B, Hq, Lq, D] tensors (one per chunk, same dtype).
        lses: the matching [B, Hq, Lq] fp32 tensors (or all fp64); -inf marks a row that saw
            no key of the chunk (its out_c is ignored).
    Returns:
        out [B, Hq, Lq, D] in outs' dtype (summed in lses' dtype) and lse [B, Hq, Lq], -inf
        where no chunk had a key for the row (out 0 there). Differentiable in every out_c and
        lse_c (autograd), so gradients flow back through each chunk's attention call.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        _checks.fail("merge_attention", f"outs and lses must be non-empty and of equal length; "
                     f"got {len(outs)} and {len(lses)}")
    _checks.check_tensor("merge_attention", "lses[0]", lses[0], ndim=3)
    if lses[0].dtype not in (torch.float32, torch.float64):
        _checks.fail("merge_attention", f"lses must be float32 (or float64); got {lses[0].dtype}",
                     TypeError)
    for c, (o, l) in enumerate(zip(outs, lses)):
        _checks.check_tensor("merge_attention", f"lses[{c}]", l, dtypes=(lses[0].dtype,), ndim=3)
        _checks.check_shape("merge_attention", f"outs[{c}]", o, (*lses[0].shape, outs[0].shape[-1]))
        _checks.check_shape("merge_attention", f"lses[{c}]", l, tuple(lses[0].shape))
    lse_all = torch.stack(lses)                                         # [C, B, Hq, Lq]
    lse = torch.logsumexp(lse_all, dim=0)                               # -inf: no key anywhere
    # exp(lse_c - lse), 0 for an empty chunk and for rows no chunk sees (never NaN).
    w = torch.exp(lse_all - lse.masked_fill(lse == float("-inf"), 0.0))
    out = sum(w[c, ..., None] * o.to(w.dtype).masked_fill(torch.isneginf(lses[c])[..., None], 0.0)
              for c, o in enumerate(outs))
    return out.to(outs[0].dtype), lse


_warned = False


def bidirectional_attention(q, k, v, key_padding_mask=None, *, scale=None, backend=None):
    """Deprecated: `attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale,
    backend=backend)`, under its former name and signature. Warns once per process."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("llada_kernels.bidirectional_attention is deprecated; use "
                      "llada_kernels.attention(q, k, v, key_padding_mask=...), which also takes "
                      "the structured masks of llada_kernels.masks", DeprecationWarning, stacklevel=2)
    return attention(q, k, v, key_padding_mask=key_padding_mask, scale=scale, backend=backend)


def _check(q, k, v):
    _checks.check_tensor(OP, "q", q, dtypes=_checks.FLOAT_DTYPES + (torch.float64,), ndim=4)
    B, Hq, Lq, D = q.shape
    _checks.check_tensor(OP, "k", k, dtypes=(q.dtype,), ndim=4)
    _checks.check_tensor(OP, "v", v, dtypes=(q.dtype,), ndim=4)
    Hkv, Lk = k.shape[1], k.shape[2]
    _checks.check_shape(OP, "k", k, (B, "Hkv", "Lk", D))
    _checks.check_shape(OP, "v", v, (B, Hkv, Lk, D))
    _checks.check_device(OP, "k", k, q.device, "q")
    _checks.check_device(OP, "v", v, q.device, "q")
    _checks.check_multiple(OP, "the query heads Hq", Hq, Hkv, "the KV heads Hkv")
    if D == 0:
        _checks.fail(OP, "the head dimension D must be >= 1; got 0")
    return B, Hq, Lq, D, Hkv, Lk


def _mask(mask, B, Lq, Lk, device, key_padding_mask, block_size, q_offset, q_positions,
          cu_seqlens, document_ids):
    """The AttentionMask of this call, checked against q and k; None (every key); or
    key_padding_mask itself when it is the whole mask."""
    if key_padding_mask is not None:
        _checks.check_tensor(OP, "key_padding_mask", key_padding_mask, dtypes=(torch.bool,), ndim=2)
        _checks.check_shape(OP, "key_padding_mask", key_padding_mask, (B, Lk))
        _checks.check_device(OP, "key_padding_mask", key_padding_mask, device, "q")
    keywords = {"block_size": block_size, "q_offset": q_offset, "q_positions": q_positions,
                "cu_seqlens": cu_seqlens, "document_ids": document_ids}
    given = [name for name, value in keywords.items() if value is not None]
    if mask is not None:
        if not isinstance(mask, masks.AttentionMask):
            _checks.fail(OP, f"mask must be an llada_kernels.masks.AttentionMask; got "
                         f"{type(mask).__name__} (a [B, Lk] bool key padding mask goes in "
                         "key_padding_mask=)", TypeError)
        if given:
            _checks.fail(OP, f"give mask= or the mask keywords ({', '.join(given)}), not both; "
                         "build the mask with llada_kernels.masks")
    elif block_size is not None:
        mask = masks.block_causal(block_size, seq_len=Lk, batch_size=B, q_len=Lq,
                                  q_offset=q_offset, q_positions=q_positions,
                                  cu_seqlens=cu_seqlens, document_ids=document_ids,
                                  key_padding_mask=key_padding_mask, device=device)
        key_padding_mask = None
    elif cu_seqlens is not None or document_ids is not None:
        mask = masks.documents(cu_seqlens=cu_seqlens, document_ids=document_ids, seq_len=Lk,
                               batch_size=B, q_len=Lq, q_offset=q_offset, q_positions=q_positions,
                               key_padding_mask=key_padding_mask)
        key_padding_mask = None
    elif given:
        _checks.fail(OP, f"{given[0]} places queries for a block-causal or document mask; give "
                     "block_size, cu_seqlens or document_ids with it")
    elif key_padding_mask is not None:
        return key_padding_mask
    if mask is None:
        return None
    if key_padding_mask is not None:
        mask = mask.with_key_padding(key_padding_mask)
    _checks.check_device(OP, "mask", mask.q_mask, device, "q")
    if mask.batch_size not in (1, B) or mask.q_len != Lq or mask.k_len != Lk:
        _checks.fail(OP, f"mask is for batch {mask.batch_size}, {mask.q_len} queries and "
                     f"{mask.k_len} keys; q and k have batch {B}, {Lq} queries and {Lk} keys")
    return mask


# ---- fakes and autograd, for every schema twin -------------------------------------------

def _fwd_fake(q, k, v, *masks_and_scale):
    B, Hq, Lq, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device))


def _bwd_fake(grad_out, q, k, v, *rest):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, *mask_tensors, scale = inputs           # mask_tensors = (q_mask, k_mask)
    out, lse = output
    ctx.save_for_backward(q, k, v, *mask_tensors, out, lse)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # lse is usually unused: its gradient then stays None


def _make_backward(bwd):
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
            raise RuntimeError(
                f"{OP}: double backward (create_graph=True) is not supported by the cpu, triton "
                "and cuda kernels: their backward is not differentiable. Use backend='reference' "
                "for second derivatives.")
        q, k, v, *mask_tensors, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else _checks.unit_stride(grad_out)
        grad_lse = None if grad_lse is None else grad_lse.float().contiguous()
        dq, dk, dv = bwd(grad_out, q, k, v, *mask_tensors, out, lse, ctx.scale, grad_lse)
        return (dq, dk, dv, *(None for _ in mask_tensors), None)
    return backward


def register():
    ops = [("attention_fwd", "attention_bwd"), ("attention_fwd_triton", "attention_bwd_triton")]
    for fwd, bwd in ops:
        torch.library.register_fake(f"llada::{fwd}")(_fwd_fake)
        torch.library.register_fake(f"llada::{bwd}")(_bwd_fake)
        torch.library.register_autograd(f"llada::{fwd}", _make_backward(getattr(torch.ops.llada, bwd)),
                                        setup_context=_setup_context)
