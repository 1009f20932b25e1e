"""LLaDA training and evaluation steps on the fused loss: the model's hidden states go
straight into `fused_linear_masked_diffusion_loss`, so [B, L, V] logits are never
materialised and the lm_head runs only on masked rows.

    loss = pretrain_loss(model, input_ids)                  # GUIDELINES.md pre-training
    loss = sft_loss(model, input_ids, prompt_lengths)       # GUIDELINES.md SFT
    ll = log_likelihood(model, prompt, answer)              # get_log_likelihood.py
    patch_llada(released_model)                              # attention -> llada_kernels.attention

`model` is an LLaDAModel, or a model built by the released `modeling_llada.py` (loaded with
`trust_remote_code`): both give hidden states after ln_f and the lm_head weight (see
`hidden_and_head`). Shapes: B batch, L sequence, D d_model, V vocabulary.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn as nn

from . import ops
from .ops.loss import fused_linear_masked_diffusion_loss
from .training import forward_process

LLADA_MASK_ID = 126336


# ---- the model's hidden states and head ------------------------------------------------------

def hidden_and_head(model, input_ids, attention_mask=None, *, rows=None):
    """Hidden states after ln_f [B, L, D] and the lm_head (weight [V, D], bias or None).

    LLaDAModel: its `hidden_states` and `lm_head_weight`. A released LLaDAModelLM: its own
    forward runs with `transformer.ff_out` swapped for an identity, so the "logits" it returns
    are the hidden states and the [B, L, V] logits are never formed. This is also how to swap
    the loss in a trainer built on the released model:

        hidden, (weight, bias) = hidden_and_head(model, noisy_batch)
        loss = llada_kernels.fused_linear_masked_diffusion_loss(
            hidden, weight, input_ids, masked_indices, p_mask, bias=bias) / (B * L)

    rows: None, or a [B, L] bool mask: then only hidden[rows], [N, D], is returned (an
    LLaDAModel computes its last layer's attn_out and MLP for these rows only; see
    LLaDAModel.hidden_states' output_positions).
    """
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head_weight"):
        return (model.hidden_states(input_ids, attention_mask, output_positions=rows),
                (model.lm_head_weight, None))
    inner = getattr(model, "model", model)
    t = getattr(inner, "transformer", None)
    if t is None:
        raise TypeError(f"{type(model).__name__} is neither an LLaDAModel nor a model built by "
                        "LLaDA's modeling_llada.py (no .model.transformer)")
    config = inner.config
    if getattr(config, "scale_logits", False):
        raise NotImplementedError("scale_logits=True: the logits are not a plain linear head")
    tied = config.weight_tying
    head = t.wte if tied else t.ff_out
    weight, bias = head.weight, getattr(head, "bias", None)
    with _identity_head(inner, t, tied):
        hidden = model(input_ids, attention_mask=attention_mask).logits
    return (hidden if rows is None else hidden[rows]), (weight, bias)


@contextlib.contextmanager
def _identity_head(inner, t, tied):
    saved = t["ff_out"] if not tied else None
    t["ff_out"] = nn.Identity()
    if tied:
        inner.config.weight_tying = False
    try:
        yield
    finally:
        if tied:
            inner.config.weight_tying = True
            del t["ff_out"]
        else:
            t["ff_out"] = saved


def _mask_id(model, mask_id):
    if mask_id is not None:
        return mask_id
    mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    return LLADA_MASK_ID if mask_id is None else mask_id


# ---- pre-training and SFT ---------------------------------------------------------------------

def pretrain_loss(model, input_ids, *, mask_id=None, eps=1e-3, generator=None, backend=None):
    """LLaDA's pre-training loss: sum over masked positions of CE / p_mask, divided by B * L.

    input_ids [B, L] int64 (cut to a random length beforehand for LLaDA's 1% of short
    batches). Returns a scalar fp32 tensor with autograd to the model.
    """
    B, L = input_ids.shape
    noisy, masked, p_mask = forward_process(input_ids, eps=eps, mask_id=_mask_id(model, mask_id),
                                            generator=generator)
    return _masked_rows_loss(model, noisy, input_ids, masked, p_mask, backend) / (B * L)


def sft_loss(model, input_ids, prompt_lengths, *, mask_id=None, eps=1e-3, generator=None,
             backend=None):
    """LLaDA's SFT loss: the prompt is never masked; sum over masked positions of
    CE / p_mask / answer_length (padding EOS counts as answer), divided by B.

    input_ids [B, L] int64, prompt_lengths [B] int64.
    """
    B, L = input_ids.shape
    noisy, masked, p_mask = forward_process(input_ids, eps=eps, mask_id=_mask_id(model, mask_id),
                                            prompt_lengths=prompt_lengths, generator=generator)
    answer_length = (L - prompt_lengths).to(p_mask.dtype)                          # [B]
    return _masked_rows_loss(model, noisy, input_ids, masked, p_mask * answer_length[:, None],
                             backend) / B


def _masked_rows_loss(model, noisy, targets, masked, divisor, backend):
    """sum over masked (b, l) of CE(logits[b, l], targets[b, l]) / divisor[b, l], with the
    hidden states (and an LLaDAModel's last layer) computed only for the N masked rows, which
    go into the fused loss as one [1, N] sequence. noisy, targets [B, L] int64, masked [B, L]
    bool, divisor [B, L] float32."""
    hidden, (weight, bias) = hidden_and_head(model, noisy, rows=masked)              # [N, D]
    every = torch.ones((1, hidden.shape[0]), dtype=torch.bool, device=hidden.device)
    return fused_linear_masked_diffusion_loss(hidden[None], weight, targets[masked][None], every,
                                              divisor[masked][None], bias=bias, backend=backend)


# ---- Monte-Carlo log-likelihood ---------------------------------------------------------------

def stratified_masks(b, prompt_length, answer_length, *, device=None, generator=None):
    """get_log_likelihood.py's noise: row i masks exactly n_i of the answer positions, with
    n_i spread evenly over [1, T] from a random start (a stratified sample), positions chosen
    uniformly. Vectorised (a random rank per position instead of a loop of randperm).
    Returns is_mask [b, Lp + T] bool and the mask ratio n_i / T [b]."""
    T = answer_length
    k = torch.randint(1, T + 1, (), device=device, generator=generator)
    n = torch.round(torch.linspace(k.float(), k + (b - 1) * (T / b), steps=b, device=device)).long()
    n = (n - 1) % T + 1                                                            # [b] in [1, T]
    rank = torch.rand(b, T, device=device, generator=generator).argsort(-1).argsort(-1)
    answer_mask = rank < n[:, None]                                                # [b, T]
    prompt_mask = torch.zeros(b, prompt_length, dtype=torch.bool, device=device)
    return torch.cat([prompt_mask, answer_mask], 1), n / T


def mc_batch_loss(model, seq, is_mask, ratio, prompt_length, *, cfg_scale=0.0, mask_id=None,
                  backend=None):
    """One mini-batch of the estimator: sum over masked positions of CE / ratio, divided by
    the batch size. seq [b, L] clean, is_mask [b, L], ratio [b].

    CFG is applied to the hidden states: the lm_head is linear, so
    W (h_un + (s + 1)(h - h_un)) is the reference's un + (s + 1)(cond - un) on logits (up to
    rounding), and the fused loss still never forms logits.
    """
    mask_id = _mask_id(model, mask_id)
    b = seq.shape[0]
    x = torch.where(is_mask, mask_id, seq)
    if cfg_scale > 0:
        un = x.clone()
        un[:, :prompt_length] = mask_id
        h, (weight, bias) = hidden_and_head(model, torch.cat([x, un]))
        h_c, h_un = h[:b], h[b:]
        h = h_un + (cfg_scale + 1) * (h_c - h_un)
    else:
        h, (weight, bias) = hidden_and_head(model, x)
    return fused_linear_masked_diffusion_loss(h, weight, seq, is_mask, ratio, bias=bias,
                                         backend=backend) / b


@torch.no_grad()
def log_likelihood(model, prompt, answer, mc_num=128, batch_size=16, cfg_scale=0.0,
                   mask_id=None, *, generator=None, backend=None) -> float:
    """Monte-Carlo estimate of log p(answer | prompt), LLaDA's get_log_likelihood():
    minus the mean over mc_num / batch_size mini-batches of mc_batch_loss.
    prompt [Lp], answer [T] int64. One host synchronisation, at the end."""
    if mc_num % batch_size:
        raise ValueError(f"log_likelihood: mc_num ({mc_num}) must be a multiple of batch_size ({batch_size})")
    if answer.numel() == 0:
        raise ValueError("log_likelihood: answer is empty")
    device = model.device
    seq = torch.cat([prompt, answer]).to(device)[None].expand(batch_size, -1)
    total = torch.zeros((), device=device)
    for _ in range(mc_num // batch_size):
        is_mask, ratio = stratified_masks(batch_size, len(prompt), len(answer), device=device,
                                          generator=generator)
        total += mc_batch_loss(model, seq, is_mask, ratio, len(prompt), cfg_scale=cfg_scale,
                               mask_id=mask_id, backend=backend)
    return -float(total) / (mc_num // batch_size)


# ---- the released model ------------------------------------------------------------------------

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

    The loss is swapped separately: see `hidden_and_head`, or use `pretrain_loss` / `sft_loss`,
    which accept the released model directly.
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
