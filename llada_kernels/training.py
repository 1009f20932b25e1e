"""LLaDA training and evaluation: the noising processes and the losses, on the masked
diffusion loss ops. Semantics: ../shared/llada/SEMANTICS.md (GUIDELINES.md's formulas and
get_log_likelihood.py).

    loss = pretrain_loss(model, input_ids)                  # GUIDELINES.md pre-training
    loss = sft_loss(model, input_ids, prompt_lengths)       # GUIDELINES.md SFT
    ll = log_likelihood(model, prompt, answer)              # get_log_likelihood.py

These take the model: its hidden states go straight into `fused_linear_masked_diffusion_loss`,
so [B, L, V] logits are never materialised, and the last layer runs its output projection and
MLP on the masked rows only. `model` is an LLaDAModel or a model built by the released
`modeling_llada.py` (see `hidden_and_head`; `llada_kernels.patch.patch_llada` runs its attention
on our op). The pieces, for your own training loop:

    noisy, masked, p_mask = forward_process(input_ids)                 # pre-training / SFT noise
    noisy, masked, ratio = mc_forward_process(seq, prompt_length)      # the estimator's noise
    llada_pretrain_loss(x, input_ids, masked, p_mask)                  # from logits [B, L, V] or,
    llada_sft_loss(x, input_ids, masked, p_mask, prompt_lengths)       # with lm_head_weight=,
                                                                       # hidden states [B, L, D]

Block diffusion (BD3-LM, LLaDA2.0/2.1, Fast-dLLM v2): the model reads the concatenation
[x_t ; x_0] of length 2L under the 2L mask (masks.block_diffusion: noisy block n sees itself
and clean blocks < n, clean block n sees clean blocks <= n), and the loss is on x_t's masked
positions, again on the fused linear loss with the last layer on those rows only:

    loss = block_diffusion_loss(model, input_ids)                       # dFactory's objective
    loss = block_diffusion_loss(model, input_ids, complementary=True,   # LLaDA2.0 / Fast-dLLM v2
                                document_ids=doc_ids)                   # packed documents
    noisy, masked, t = block_diffusion_noise(input_ids, mask_id=...)    # the pieces
    loss = block_diffusion_loss_from_noise(model, noisy, input_ids, masked, t)

Shapes: B batch, L sequence, D d_model, V vocabulary; b samples of one sequence, Lp prompt, T
answer length.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from . import _checks, masks
from .constants import MASK_ID
from .ops.loss import fused_linear_masked_diffusion_loss, masked_diffusion_loss

EPS = 1e-3  # GUIDELINES.md: p_mask = (1 - eps) t + eps


# ---- noise -----------------------------------------------------------------------------------

def forward_process(input_ids, *, eps=EPS, mask_id=MASK_ID, prompt_lengths=None, generator=None):
    """LLaDA's forward (noising) process, for pre-training or, with prompt_lengths, SFT.

    Per sequence b: t_b ~ U[0, 1), p_mask_b = (1 - eps) * t_b + eps; every token is masked
    independently with probability p_mask_b. For SFT, positions < prompt_lengths[b] are never
    masked.

    Args:
        input_ids: [B, L] int64, the clean tokens.
        eps: the smallest mask probability, in (0, 1].
        prompt_lengths: [B] integer, each in [0, L), or None (pre-training).

    Returns:
        noisy: [B, L] int64, input_ids with the masked positions set to mask_id.
        masked: [B, L] bool, the masked positions. (LLaDA's SFT code recomputes them as
            noisy == mask_id, which differs only where the clean prompt holds mask_id.)
        p_mask: [B, L] float32, each position's mask probability.
    """
    return _noise("forward_process", input_ids, eps, mask_id, prompt_lengths, generator)


def _noise(op, input_ids, eps, mask_id, prompt_lengths, generator):
    """forward_process, its errors named after `op`, the function the user called."""
    _check_ids(op, input_ids)
    B, L = input_ids.shape
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        _checks.fail(op, f"eps must be a float in (0, 1]; got {eps!r}")
    if prompt_lengths is not None:
        _check_prompt_lengths(op, prompt_lengths, B, L)
    device = input_ids.device
    t = torch.rand(B, device=device, generator=generator)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(B, L)
    masked = torch.rand((B, L), device=device, generator=generator) < p_mask
    if prompt_lengths is not None:
        masked &= torch.arange(L, device=device) >= prompt_lengths[:, None]
    return torch.where(masked, mask_id, input_ids), masked, p_mask.contiguous()


def mc_forward_process(seq, prompt_length, *, mask_id=MASK_ID, generator=None):
    """The Monte-Carlo estimator's noising (get_log_likelihood.py's forward_process): sample i
    of b copies of one sequence masks exactly n_i of its T answer positions, the counts spread
    evenly over [1, T] from a random start (a stratified sample), the positions uniform (a
    random rank per position instead of the reference's loop of randperm).

    Args:
        seq: [b, Lp + T] int64, b copies of one sequence; prompt_length: Lp, with T >= 1.

    Returns:
        noisy [b, L] int64, masked [b, L] bool, and the mask ratio n_i / T, [b] float32.
    """
    b, L = seq.shape
    T = L - prompt_length
    if T < 1:
        _checks.fail("mc_forward_process", f"prompt_length ({prompt_length}) must be less than "
                     f"the sequence length ({L}): the answer needs a token")
    device = seq.device
    k = torch.randint(1, T + 1, (), device=device, generator=generator)
    n = torch.round(torch.linspace(k.float(), k + (b - 1) * (T / b), steps=b, device=device)).long()
    n = (n - 1) % T + 1                                                            # [b] in [1, T]
    rank = torch.rand(b, T, device=device, generator=generator).argsort(-1).argsort(-1)
    masked = torch.zeros((b, L), dtype=torch.bool, device=device)
    masked[:, prompt_length:] = rank < n[:, None]                                  # [b, T]
    return torch.where(masked, mask_id, seq), masked, n / T


# ---- losses from logits or hidden states -----------------------------------------------------

def llada_pretrain_loss(x, input_ids, masked_indices, p_mask, *, lm_head_weight=None,
                        lm_head_bias=None, chunk_size=None, backend=None):
    """Pre-training loss: sum over masked of CE / p_mask, divided by B * L (L the padded length).

    x: logits [B, L, V], or hidden states [B, L, D] when lm_head_weight [V, D] is given.
    input_ids [B, L] int64 (the clean tokens), masked_indices [B, L] bool, p_mask [B, L] or [B].
    Returns a float32 scalar.
    """
    B, L = input_ids.shape
    loss = _loss(x, input_ids, masked_indices, p_mask, lm_head_weight, lm_head_bias, chunk_size, backend)
    return loss / (B * L)


def llada_sft_loss(x, input_ids, masked_indices, p_mask, prompt_lengths, *, lm_head_weight=None,
                   lm_head_bias=None, chunk_size=None, backend=None):
    """SFT loss: sum over masked of CE / p_mask / answer_length[b], divided by B.

    answer_length[b] = L - prompt_lengths[b] (padding EOS counts as answer). Shapes as
    llada_pretrain_loss, plus prompt_lengths [B] integer, each in [0, L).
    """
    B, L = input_ids.shape
    _check_prompt_lengths("llada_sft_loss", prompt_lengths, B, L)
    p = p_mask[:, None].expand(B, L) if p_mask.dim() == 1 else p_mask
    divisor = _sft_divisor(p, prompt_lengths, L)
    loss = _loss(x, input_ids, masked_indices, divisor, lm_head_weight, lm_head_bias, chunk_size, backend)
    return loss / B


def _loss(x, input_ids, masked, p_mask, lm_head_weight, lm_head_bias, chunk_size, backend):
    if lm_head_weight is None:
        if lm_head_bias is not None or chunk_size is not None:
            raise ValueError("lm_head_bias and chunk_size need lm_head_weight (x is then hidden states)")
        return masked_diffusion_loss(x, input_ids, masked, p_mask, backend=backend)
    return fused_linear_masked_diffusion_loss(x, lm_head_weight, input_ids, masked, p_mask,
                                              bias=lm_head_bias, chunk_size=chunk_size, backend=backend)


def _sft_divisor(p_mask, prompt_lengths, L):
    """p_mask [B, L] * answer_length [B, 1]: the SFT loss's per-position divisor."""
    return p_mask * (L - prompt_lengths).to(p_mask.dtype)[:, None]


# ---- losses from the model -------------------------------------------------------------------

def hidden_and_head(model, input_ids, attention_mask=None, *, rows=None, **model_kwargs):
    """Hidden states after the final norm [B, L, D] and the lm_head (weight [V, D], bias or
    None), for the fused loss: the [B, L, V] logits are never formed. How to swap the loss in
    a trainer:

        hidden, (weight, bias) = hidden_and_head(model, noisy_batch, attention_mask)
        loss = llada_kernels.fused_linear_masked_diffusion_loss(
            hidden, weight, input_ids, masked_indices, p_mask, bias=bias) / (B * L)

    model:
      * an LLaDAModel: its `hidden_states` and `lm_head_weight`;
      * a model built by the released `modeling_llada.py` (LLaDAModelLM): its own forward runs
        with `transformer.ff_out` swapped for an identity, so the "logits" it returns are the
        hidden states;
      * any other transformers model with an lm_head (`get_output_embeddings()`, a Linear):
        Dream and SDAR (Qwen2/Qwen3-based), LLaDA2.0/2.1 (MoE), ...: its base model
        (`get_decoder()`, else the `base_model_prefix` attribute) runs and its
        `last_hidden_state` is returned. What the LM class itself adds after its base model
        is skipped: a router's auxiliary loss (request it from the base model's outputs
        yourself), and a head that is not a plain Linear of the hidden states (logit
        soft-capping or scaling: config.final_logit_softcapping, logit_scale, logits_scaling,
        scale_logits) is refused with NotImplementedError. Logit shifting (Dream's
        right-shifted logits) is the caller's, as with logits.
    model_kwargs: passed to the model's forward unchanged: position_ids, attention_bias (the
        released LLaDA file), a 4-D attention_mask, ... (use_cache defaults to False for
        transformers models).
    rows: None, or a [B, L] bool mask: then only hidden[rows], [N, D], is returned (an
        LLaDAModel computes its last layer's attn_out and MLP for these rows only; see
        LLaDAModel.hidden_states' output_positions).
    """
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head_weight"):
        return (model.hidden_states(input_ids, attention_mask, output_positions=rows, **model_kwargs),
                (model.lm_head_weight, None))
    inner = getattr(model, "model", model)
    t = getattr(inner, "transformer", None)
    if t is None:
        head, body = _hf_head_and_body(model)
        model_kwargs.setdefault("use_cache", False)
        out = body(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return (hidden if rows is None else hidden[rows]), (head.weight, head.bias)
    config = inner.config
    _refuse_scaled_logits(config)
    tied = config.weight_tying
    head = t.wte if tied else t.ff_out
    weight, bias = head.weight, getattr(head, "bias", None)
    with _identity_head(inner, t, tied):
        hidden = model(input_ids, attention_mask=attention_mask, **model_kwargs).logits
    return (hidden if rows is None else hidden[rows]), (weight, bias)


def _hf_head_and_body(model):
    """(lm_head, base model) of a transformers model, or TypeError naming what is missing."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"hidden_and_head: {type(model).__name__} is neither an LLaDAModel, a model "
                        "built by LLaDA's modeling_llada.py, nor a transformers model whose "
                        "get_output_embeddings() is an nn.Linear lm_head; got "
                        f"{type(head).__name__ if head is not None else 'no lm_head'}")
    get_body = getattr(model, "get_decoder", None)
    body = get_body() if callable(get_body) else None
    if body is None or body is model:
        body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(body, nn.Module) or body is model:
        raise TypeError(f"hidden_and_head: {type(model).__name__} has an lm_head but no base model "
                        "(get_decoder() or the base_model_prefix attribute) to run without it")
    _refuse_scaled_logits(getattr(model, "config", None))
    return head, body


def _refuse_scaled_logits(config):
    """NotImplementedError when the model's logits are not lm_head(hidden) as they are."""
    for name in ("scale_logits", "final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, False, 1, 1.0):
            raise NotImplementedError(f"hidden_and_head: the model's config has {name}={value!r}: "
                                      "its logits are not a plain linear head of the hidden states")


def _has_head(model) -> bool:
    """Whether hidden_and_head can serve the model (else only its logits can be used)."""
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head_weight"):
        return True
    if getattr(getattr(model, "model", model), "transformer", None) is not None:
        return True
    try:
        _hf_head_and_body(model)
    except (TypeError, NotImplementedError):
        return False
    return True


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


def pretrain_loss(model, input_ids, *, mask_id=None, eps=EPS, generator=None, backend=None):
    """LLaDA's pre-training loss: sum over masked positions of CE / p_mask, divided by B * L.

    input_ids [B, L] int64 (cut to a random length beforehand for LLaDA's 1% of short
    batches). mask_id: default the model's config.mask_token_id. Returns a scalar fp32 tensor
    with autograd to the model.
    """
    op = "pretrain_loss"
    noisy, masked, p_mask = _noise(op, input_ids, eps, _mask_id(op, model, mask_id), None, generator)
    B, L = input_ids.shape
    return _masked_rows_loss(model, noisy, input_ids, masked, p_mask, backend) / (B * L)


def sft_loss(model, input_ids, prompt_lengths, *, mask_id=None, eps=EPS, generator=None,
             backend=None):
    """LLaDA's SFT loss: the prompt is never masked; sum over masked positions of
    CE / p_mask / answer_length (padding EOS counts as answer), divided by B.

    input_ids [B, L] int64, prompt_lengths [B] integer, each in [0, L).
    """
    op = "sft_loss"
    noisy, masked, p_mask = _noise(op, input_ids, eps, _mask_id(op, model, mask_id), prompt_lengths,
                                   generator)
    B, L = input_ids.shape
    divisor = _sft_divisor(p_mask, prompt_lengths, L)
    return _masked_rows_loss(model, noisy, input_ids, masked, divisor, backend) / B


def _masked_rows_loss(model, noisy, targets, masked, divisor, backend):
    """sum over masked (b, l) of CE(logits[b, l], targets[b, l]) / divisor[b, l], with the
    hidden states (and an LLaDAModel's last layer) computed only for the N masked rows, which
    go into the fused loss as one [1, N] sequence. noisy, targets [B, L] int64, masked [B, L]
    bool, divisor [B, L] float32."""
    hidden, (weight, bias) = hidden_and_head(model, noisy, rows=masked)              # [N, D]
    every = torch.ones((1, hidden.shape[0]), dtype=torch.bool, device=hidden.device)
    return fused_linear_masked_diffusion_loss(hidden[None], weight, targets[masked][None], every,
                                              divisor[masked][None], bias=bias, backend=backend)


# ---- Monte-Carlo log-likelihood -----------------------------------------------------------------

def mc_batch_loss(model, seq, is_mask, ratio, prompt_length, *, cfg_scale=0.0, mask_id=None,
                  backend=None):
    """One mini-batch of the estimator: sum over masked positions of CE / ratio, divided by
    the batch size b. seq [b, L] clean, is_mask [b, L] bool, ratio [b].

    A model that hidden_and_head serves gets the fused loss, with CFG applied to the hidden
    states: the lm_head is linear, so W (h_un + (s + 1)(h - h_un)) is the reference's
    un + (s + 1)(cond - un) on logits (up to rounding), and logits are never formed. Any other
    callable mapping ids [b, L] to logits [b, L, V] (or to an object with .logits) gets the
    reference's computation on its logits.
    """
    mask_id = _mask_id("mc_batch_loss", model, mask_id)
    b = seq.shape[0]
    x = torch.where(is_mask, mask_id, seq)
    if cfg_scale > 0:
        un = x.clone()
        un[:, :prompt_length] = mask_id
        x = torch.cat([x, un])
    if _has_head(model):
        h, (weight, bias) = hidden_and_head(model, x)
        if cfg_scale > 0:
            h_c, h_un = h[:b], h[b:]
            h = h_un + (cfg_scale + 1) * (h_c - h_un)
        loss = fused_linear_masked_diffusion_loss(h, weight, seq, is_mask, ratio, bias=bias,
                                                  backend=backend)
    else:
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        if cfg_scale > 0:
            cond, un = logits.chunk(2)
            logits = un + (cfg_scale + 1) * (cond - un)
        loss = masked_diffusion_loss(logits, seq, is_mask, ratio, backend=backend)
    return loss / b


@torch.no_grad()
def log_likelihood(model, prompt, answer, mc_num=128, batch_size=16, cfg_scale=0.0, mask_id=None,
                   *, generator=None, backend=None) -> float:
    """Monte-Carlo estimate of log p(answer | prompt), LLaDA's get_log_likelihood() (its
    arguments, in its order): minus the mean over mc_num / batch_size mini-batches of
    mc_batch_loss, each on mc_forward_process's noise. One host synchronisation, at the end.

    Args:
        model: an LLaDAModel or a released LLaDAModelLM (fused loss, logits never formed), or
            any callable mapping ids [b, L] to logits [b, L, V] or to an object with .logits.
        prompt: [Lp] int64; answer: [T] int64, T >= 1.
        mc_num: samples in all, a multiple of batch_size.
        cfg_scale: classifier-free guidance s >= 0; the unconditional pass masks the whole
            prompt and the logits become un + (s + 1) * (cond - un).
        mask_id: default the model's config.mask_token_id, else LLaDA's.
    """
    op = "log_likelihood"
    for name, v in (("mc_num", mc_num), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _checks.fail(op, f"{name} must be a positive int; got {v!r}")
    if mc_num % batch_size:
        _checks.fail(op, f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size})")
    for name, t in (("prompt", prompt), ("answer", answer)):
        _checks.check_tensor(op, name, t, dtypes=(torch.int64,), ndim=1)
    if answer.numel() == 0:
        _checks.fail(op, "answer is empty; it needs at least one token")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) \
            or not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        _checks.fail(op, f"cfg_scale must be a finite float >= 0; got {cfg_scale!r}")
    device = getattr(model, "device", prompt.device)
    seq = torch.cat([prompt, answer]).to(device)[None].expand(batch_size, -1)
    mask_id = _mask_id(op, model, mask_id)
    total = torch.zeros((), device=device)
    for _ in range(mc_num // batch_size):
        _, is_mask, ratio = mc_forward_process(seq, len(prompt), mask_id=mask_id, generator=generator)
        total += mc_batch_loss(model, seq, is_mask, ratio, len(prompt), cfg_scale=cfg_scale,
                               mask_id=mask_id, backend=backend)
    return -float(total) / (mc_num // batch_size)


get_log_likelihood = log_likelihood  # the name in LLaDA's get_log_likelihood.py


# ---- block diffusion: the 2L objective ---------------------------------------------------------

LOSS_WEIGHTS = ("uniform", "elbo")
NORMALIZE = ("masked", "maskable")


def block_diffusion_noise(input_ids, *, mask_id=MASK_ID, noise_range=(0.3, 0.8), maskable=None,
                          document_ids=None, complementary=False, generator=None):
    """The block-diffusion noise: each document (a row, or each packed document of a row)
    draws its own level t ~ U[noise_range), and each of its maskable tokens is masked
    independently with probability t (dFactory's sft_noise_transition, per document).

    Args:
        input_ids: [B, L] int64, the clean tokens x_0.
        noise_range: (low, high), 0 <= low <= high <= 1 (dFactory's default (0.3, 0.8)).
        maskable: [B, L] bool, the positions that may be masked and are scored (False on
            prompts and padding), or None (all).
        document_ids: [B, L] integer, non-decreasing along each row: packed documents, each
            with its own t. None: one document per row.
        complementary: also return, as rows B..2B-1, each sample masked on exactly its other
            maskable positions, at level 1 - t (LLaDA2.0's and Fast-dLLM v2's complementary
            masking: every maskable token is scored once per pair).

    Returns:
        noisy [B', L] int64, masked [B', L] bool, t [B', L] float32 (each position's document
        level); B' = 2B with complementary, else B.
    """
    op = "block_diffusion_noise"
    _check_ids(op, input_ids)
    B, L = input_ids.shape
    low, high = _check_range(op, noise_range)
    maskable = _check_bool(op, "maskable", maskable, B, L)
    first = _doc_starts(op, document_ids, B, L, input_ids.device)                  # [B, L]
    u = torch.rand((B, L), device=input_ids.device, generator=generator)
    t = (low + (high - low) * u).gather(1, first)                # each document's draw, per token
    masked = torch.rand((B, L), device=input_ids.device, generator=generator) < t
    if maskable is not None:
        masked &= maskable
    if complementary:
        rest = ~masked if maskable is None else maskable & ~masked
        masked, t = torch.cat([masked, rest]), torch.cat([t, 1 - t])
        input_ids = torch.cat([input_ids, input_ids])
    return torch.where(masked, mask_id, input_ids), masked, t


def block_diffusion_loss(model, input_ids, *, block_size=None, mask_id=None, noise_range=(0.3, 0.8),
                         maskable=None, document_ids=None, attention_mask=None,
                         complementary=False, loss_weight="uniform", normalize="masked",
                         generator=None, backend=None, dp_group=None):
    """The block-diffusion training loss of one batch: block_diffusion_noise, then
    block_diffusion_loss_from_noise (see both). The defaults are dFactory's LLaDA2 objective
    (train_llada2_bd.py): t ~ U[0.3, 0.8), every masked token's cross-entropy weighted 1,
    divided by the number of masked tokens. BD3-LM's (dllm's BD3LMTrainer, linear schedule)
    is noise_range=(1e-3, 1), loss_weight="elbo", normalize="maskable". attention_mask [B, L]
    (1 = token): padding is hidden as keys; mark it unmaskable too (maskable=).
    dp_group: data parallelism, see block_diffusion_loss_from_noise (each rank draws its own
    noise: seed each rank's generator differently).
    Returns a float32 scalar with autograd to the model."""
    op = "block_diffusion_loss"
    mask_id = _mask_id(op, model, mask_id)
    noisy, masked, t = block_diffusion_noise(
        input_ids, mask_id=mask_id, noise_range=noise_range, maskable=maskable,
        document_ids=document_ids, complementary=complementary, generator=generator)
    if complementary:
        pair = (lambda x: None if x is None else torch.cat([x, x]))
        input_ids, maskable, document_ids, attention_mask = (
            pair(input_ids), pair(maskable), pair(document_ids), pair(attention_mask))
    return block_diffusion_loss_from_noise(
        model, noisy, input_ids, masked, t, block_size=block_size, maskable=maskable,
        document_ids=document_ids, attention_mask=attention_mask, loss_weight=loss_weight,
        normalize=normalize, backend=backend, dp_group=dp_group)


def block_diffusion_loss_from_noise(model, noisy, input_ids, masked, t=None, *, block_size=None,
                                    maskable=None, document_ids=None, attention_mask=None,
                                    loss_weight="uniform", normalize="masked", backend=None,
                                    dp_group=None):
    """sum over masked (b, l) of w[b, l] * CE(logits of x_t's row l, x_0[b, l]) / Z, the
    logits read from the model on [x_t ; x_0] under the 2L mask, never materialised.

    Args:
        model: an LLaDAModel (block_size defaults to its config's), or LLaDA2's model patched
            by llada_kernels.patch.patch_llada2 (block_size required).
        noisy: [B, L] int64, x_t; input_ids: [B, L] int64, x_0; masked: [B, L] bool, the
            positions of x_t that are masked (the rows of the loss).
        t: [B, L] float, each position's noise level (needed for loss_weight="elbo").
        maskable, document_ids, attention_mask: as block_diffusion_loss. Packed documents
            get their own blocks (restarting at each document start) and positions.
        loss_weight: "uniform" (w = 1, dFactory) or "elbo" (w = 1 / t, BD3-LM and LLaDA).
        normalize: Z = the number of masked tokens ("masked", dFactory) or of maskable
            tokens ("maskable", dllm's token normalisation; all tokens when maskable is None).
        dp_group: None, or the data-parallel process group when each rank holds its own
            micro-batch (DDP, FSDP2): Z is then counted over every rank's micro-batch (one
            all-reduce of one int64) and the loss is multiplied by W, the group's size, so
            that the ranks' mean (what DDP and FSDP2 average the gradients by) is the loss of
            the whole global batch: rank r returns W * S_r / Z, S_r its sum of w * CE.
            Micro-batches of different sizes are fine. Without it, each rank divides by its
            own count and the ranks' mean is a mean of means (another loss).
    Returns a float32 scalar.
    """
    op = "block_diffusion_loss"
    _check_ids(op, noisy)
    B, L = noisy.shape
    _checks.check_tensor(op, "input_ids", input_ids, dtypes=(torch.int64,), ndim=2)
    _checks.check_shape(op, "input_ids", input_ids, (B, L))
    masked = _check_bool(op, "masked", masked, B, L)
    maskable = _check_bool(op, "maskable", maskable, B, L)
    _checks.check_in(op, "loss_weight", loss_weight, LOSS_WEIGHTS)
    _checks.check_in(op, "normalize", normalize, NORMALIZE)
    if loss_weight == "elbo":
        if t is None:
            _checks.fail(op, 'loss_weight="elbo" needs t, the noise level of each position')
        _checks.check_shape(op, "t", t, (B, L))
    b = _block_size(op, model, block_size)
    first = _doc_starts(op, document_ids, B, L, noisy.device)
    pos = torch.arange(L, device=noisy.device) - first                       # [B, L] in document
    kpm = None
    if attention_mask is not None:
        _checks.check_shape(op, "attention_mask", attention_mask, (B, L))
        kpm = attention_mask.to(torch.bool)
    mask = masks.block_diffusion(b, L, batch_size=B, document_ids=document_ids,
                                 key_padding_mask=kpm, device=noisy.device)
    rows = torch.cat([masked, torch.zeros_like(masked)], 1)                    # [B, 2L]
    hidden, weight = _hidden_2l(model, torch.cat([noisy, input_ids], 1), mask,
                                torch.cat([pos, pos], 1), rows)                  # [N, D], [V, D]
    count = (masked if normalize == "masked" else
             maskable if maskable is not None else torch.ones_like(masked)).sum()
    if dp_group is not None:
        from .distributed.data_parallel import global_count
        count, world = global_count(op, count, dp_group)
    else:
        world = 1
    divisor = (count.clamp_min(1).float() / world).expand(B, L)
    if loss_weight == "elbo":
        divisor = divisor * t.float()
    every = torch.ones((1, hidden.shape[0]), dtype=torch.bool, device=hidden.device)
    return fused_linear_masked_diffusion_loss(hidden[None], weight, input_ids[masked][None], every,
                                              divisor[masked][None], backend=backend)


def _hidden_2l(model, x, mask, pos, rows):
    """Hidden states of the rows [N, D] of x [B, 2L] under the 2L mask, and the lm_head."""
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head_weight"):
        return (model.hidden_states(x, mask=mask, position_ids=pos, output_positions=rows),
                model.lm_head_weight)
    if getattr(model, "_llada2_patched", False):
        h = model.model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False)
        return h.last_hidden_state[rows], model.lm_head.weight
    raise TypeError(f"block_diffusion_loss: model must be an LLaDAModel or a model patched by "
                    f"llada_kernels.patch.patch_llada2; got {type(model).__name__}")


def _block_size(op, model, block_size):
    if block_size is None:
        block_size = getattr(getattr(model, "config", None), "block_size", None)
        if block_size is None:
            _checks.fail(op, "block_size is needed: the model's config has none")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        _checks.fail(op, f"block_size must be a positive int; got {block_size!r}")
    return block_size


def _doc_starts(op, document_ids, B, L, device):
    """[B, L] int64: the index of the first token of each token's document (0 without
    documents). Checked: [B, L] integer ids, non-decreasing along each row."""
    arange = torch.arange(L, device=device)
    if document_ids is None:
        return torch.zeros((B, L), dtype=torch.long, device=device)
    _checks.check_tensor(op, "document_ids", document_ids, ndim=2)
    _checks.check_shape(op, "document_ids", document_ids, (B, L))
    if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
        _checks.fail(op, f"document_ids must be an integer tensor; got {document_ids.dtype}", TypeError)
    start = torch.ones((B, L), dtype=torch.bool, device=device)
    start[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    if _checks.values_checked() and L > 1 and bool((document_ids[:, 1:] < document_ids[:, :-1]).any()):
        _checks.fail(op, "document_ids must be non-decreasing along each row (a document is a run "
                     "of equal ids)")
    return torch.where(start, arange, 0).cummax(dim=1).values


def _check_range(op, noise_range):
    ok = isinstance(noise_range, (tuple, list)) and len(noise_range) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in noise_range)
    if not ok or not 0 <= noise_range[0] <= noise_range[1] <= 1:
        _checks.fail(op, f"noise_range must be (low, high) with 0 <= low <= high <= 1; got {noise_range!r}")
    return float(noise_range[0]), float(noise_range[1])


def _check_bool(op, name, t, B, L):
    if t is None:
        return None
    _checks.check_tensor(op, name, t, dtypes=(torch.bool,), ndim=2)
    _checks.check_shape(op, name, t, (B, L))
    return t


# ---- checks ------------------------------------------------------------------------------------

def _mask_id(op, model, mask_id):
    """mask_id, else the model's config.mask_token_id, else LLaDA's; checked against the
    model's vocabulary where its config gives one."""
    config = getattr(model, "config", None)
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
        mask_id = MASK_ID if mask_id is None else mask_id
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        _checks.fail(op, f"mask_id must be an int; got {mask_id!r}", TypeError)
    rows = getattr(config, "embedding_size", None) or getattr(config, "vocab_size", None)
    if mask_id < 0 or (rows is not None and mask_id >= rows):
        _checks.fail(op, f"mask_id ({mask_id}) is outside the model's vocabulary [0, {rows})")
    return mask_id


def _check_ids(op, input_ids):
    _checks.check_tensor(op, "input_ids", input_ids, dtypes=(torch.int64,), ndim=2)


def _check_prompt_lengths(op, prompt_lengths, B, L):
    """prompt_lengths [B] integer, each in [0, L): every sequence keeps an answer token (the
    SFT loss divides by L - prompt_length)."""
    if not isinstance(prompt_lengths, torch.Tensor) or prompt_lengths.dtype == torch.bool \
            or prompt_lengths.dtype.is_floating_point or prompt_lengths.dtype.is_complex:
        got = (prompt_lengths.dtype if isinstance(prompt_lengths, torch.Tensor)
               else type(prompt_lengths).__name__)
        _checks.fail(op, f"prompt_lengths must be a [B] integer tensor; got {got}", TypeError)
    if tuple(prompt_lengths.shape) != (B,):
        _checks.fail(op, f"prompt_lengths must have shape [B] = [{B}]; got {list(prompt_lengths.shape)}")
    if _checks.values_checked() and B:
        bad = (prompt_lengths < 0) | (prompt_lengths >= L)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            _checks.fail(op, f"prompt_lengths[{i}] = {int(prompt_lengths[i])} must be in [0, L) = "
                         f"[0, {L}): an SFT sequence needs at least one answer token")
