"""bidirectional_attention: fused non-causal attention with key-padding masks and GQA."""

from __future__ import annotations

import math

import torch

from .. import _backend, _checks
from ..reference import attention as reference

OP = "bidirectional_attention"
KERNEL = "bidirectional_attention_fwd"  # the schema whose kernels _backend looks up

# What each compiled backend runs: (dtypes, head dims). The reference runs anything.
SUPPORTED = {
    "cpu": (_checks.FLOAT_DTYPES, range(1, 257)),
    "triton": ((torch.bfloat16, torch.float16), (16, 32, 64, 128)),
    "cuda": ((torch.bfloat16, torch.float16), (64, 128)),
}


def bidirectional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Non-causal scaled dot-product attention, as in LLaDA's mask predictor.

        out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h // G, j]) v[b, h // G, j]

    over the keys j with key_padding_mask[b, j] True, where G = Hq / Hkv (grouped-query
    attention). It equals F.scaled_dot_product_attention(q, k, v,
    attn_mask=key_padding_mask[:, None, None, :], scale=scale, enable_gqa=True), except that a
    query row whose keys are all padded returns zeros (and gets zero gradients), never NaN.
    Differentiable in q, k and v; the compiled backends recompute the probabilities in the
    backward from a saved log-sum-exp, so memory stays O(L), never O(Lq * Lk).

    Args:
        q: [B, Hq, Lq, D] (SDPA layout). Any strides; a non-unit stride along D costs a copy.
        k: [B, Hkv, Lk, D], same dtype and device as q; Hq must be a multiple of Hkv.
        v: [B, Hkv, Lk, D], same dtype and device as q.
        key_padding_mask: [B, Lk] bool, True = attend (HF attention_mask semantics), or None
            to attend every key. Lq may differ from Lk (a block of queries attending the whole
            sequence).
        scale: softmax scale; defaults to 1 / sqrt(D).
        backend: "reference", "cpu", "triton" or "cuda"; see llada_kernels._backend.
            cpu: float32, bfloat16, float16, D <= 256. triton: bfloat16, float16,
            D in {16, 32, 64, 128}. cuda: bfloat16, float16, D in {64, 128}.

    Returns:
        out: [B, Hq, Lq, D], q's dtype, contiguous. Accumulation is in fp32.
    """
    B, Hq, Lq, D, Hkv, Lk = _check(q, k, v, key_padding_mask)
    name = _backend.resolve(KERNEL, backend, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        _checks.fail(OP, f"scale must be finite; got {scale}")
    if name == "reference":
        return reference.bidirectional_attention(q, k, v, key_padding_mask, scale)

    dtypes, head_dims = SUPPORTED[name]
    _checks.check_in(OP, "q.dtype", q.dtype, dtypes, f" on the {name} backend")
    _checks.check_in(OP, "the head dimension D", D, head_dims, f" on the {name} backend")
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    fwd = (torch.ops.llada.bidirectional_attention_fwd_triton if name == "triton"
           else torch.ops.llada.bidirectional_attention_fwd)
    out, _ = fwd(_checks.unit_stride(q), _checks.unit_stride(k), _checks.unit_stride(v), mask, scale)
    return out


def _check(q, k, v, key_padding_mask):
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
    if key_padding_mask is not None:
        _checks.check_tensor(OP, "key_padding_mask", key_padding_mask, dtypes=(torch.bool,), ndim=2)
        _checks.check_shape(OP, "key_padding_mask", key_padding_mask, (B, Lk))
        _checks.check_device(OP, "key_padding_mask", key_padding_mask, q.device, "q")
    return B, Hq, Lq, D, Hkv, Lk


# ---- fakes and autograd, for both schema twins -------------------------------------------

def _fwd_fake(q, k, v, key_padding_mask, scale):
    B, Hq, Lq, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device))


def _bwd_fake(grad_out, q, k, v, key_padding_mask, out, lse, scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _make_backward(bwd):
    def backward(ctx, grad_out, grad_lse):
        if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
            raise RuntimeError(
                f"{OP}: double backward (create_graph=True) is not supported by the cpu, triton "
                "and cuda kernels: their backward is not differentiable. Use backend='reference' "
                "for second derivatives.")
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd(_checks.unit_stride(grad_out), q, k, v, key_padding_mask, out, lse, ctx.scale)
        return dq, dk, dv, None, None
    return backward


def register():
    for suffix in ("", "_triton"):
        fwd = f"llada::bidirectional_attention_fwd{suffix}"
        bwd = f"llada::bidirectional_attention_bwd{suffix}"
        torch.library.register_fake(fwd)(_fwd_fake)
        torch.library.register_fake(bwd)(_bwd_fake)
        bwd_op = getattr(torch.ops.llada, f"bidirectional_attention_bwd{suffix}")
        torch.library.register_autograd(fwd, _make_backward(bwd_op), setup_context=_setup_context)
