"""LLaDA's noising process and losses, on top of the masked diffusion loss ops.

Semantics: ../shared/llada/SEMANTICS.md (the GUIDELINES.md formulas and get_log_likelihood.py).
Each loss takes logits [B, L, V], or hidden states [B, L, D] together with the lm_head weight
(then the fused-linear op runs and the full logits are never materialised).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .ops.loss import fused_linear_masked_diffusion_loss, masked_diffusion_loss

MASK_ID = 126336
EPS = 1e-3


def forward_process(
    input_ids: torch.Tensor,
    *,
    eps: float = EPS,
    mask_id: int = MASK_ID,
    prompt_lengths: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaDA's forward (noising) process, for pre-training or, with prompt_lengths, SFT.

    Per sequence b: t_b ~ U[0, 1), p_mask_b = (1 - eps) * t_b + eps; every token is masked
    independently with probability p_mask_b. For SFT, positions < prompt_lengths[b] are never
    masked.

    Args:
        input_ids: [B, L] int64, the clean tokens.
        prompt_lengths: [B] int64 or None (pre-training).

    Returns:
        noisy: [B, L] int64, input_ids with the masked positions set to mask_id.
        masked: [B, L] bool, the masked positions. (LLaDA's SFT code recomputes them as
            noisy == mask_id, which differs only where the clean prompt holds mask_id.)
        p_mask: [B, L] float32, each position's mask probability.
    """
    B, L = input_ids.shape
    device = input_ids.device
    t = torch.rand(B, device=device, generator=generator)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(B, L)
    masked = torch.rand((B, L), device=device, generator=generator) < p_mask
    if prompt_lengths is not None:
        masked &= torch.arange(L, device=device) >= prompt_lengths[:, None]
    return torch.where(masked, mask_id, input_ids), masked, p_mask.contiguous()


def _loss(x, input_ids, masked, p_mask, lm_head_weight, lm_head_bias, chunk_size, backend):
    if lm_head_weight is None:
        if lm_head_bias is not None or chunk_size is not None:
            raise ValueError("lm_head_bias and chunk_size need lm_head_weight (x is then hidden states)")
        return masked_diffusion_loss(x, input_ids, masked, p_mask, backend=backend)
    return fused_linear_masked_diffusion_loss(x, lm_head_weight, input_ids, masked, p_mask,
                                              bias=lm_head_bias, chunk_size=chunk_size, backend=backend)


def llada_pretrain_loss(
    x: torch.Tensor,
    input_ids: torch.Tensor,
    masked_indices: torch.Tensor,
    p_mask: torch.Tensor,
    *,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Pre-training loss: sum over masked of CE / p_mask, divided by B * L (L the padded length).

    x: logits [B, L, V], or hidden states [B, L, D] when lm_head_weight [V, D] is given.
    input_ids [B, L] int64 (the clean tokens), masked_indices [B, L] bool, p_mask [B, L] or [B].
    Returns a float32 scalar.
    """
    B, L = input_ids.shape
    loss = _loss(x, input_ids, masked_indices, p_mask, lm_head_weight, lm_head_bias, chunk_size, backend)
    return loss / (B * L)


def llada_sft_loss(
    x: torch.Tensor,
    input_ids: torch.Tensor,
    masked_indices: torch.Tensor,
    p_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    *,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """SFT loss: sum over masked of CE / p_mask / answer_length[b], divided by B.

    answer_length[b] = L - prompt_lengths[b] (padding EOS counts as answer). Shapes as
    llada_pretrain_loss, plus prompt_lengths [B] int64 (every prompt shorter than L).
    """
    B, L = input_ids.shape
    p = p_mask[:, None].expand(B, L) if p_mask.dim() == 1 else p_mask
    divisor = p * (L - prompt_lengths)[:, None].to(p.dtype)
    loss = _loss(x, input_ids, masked_indices, divisor, lm_head_weight, lm_head_bias, chunk_size, backend)
    return loss / B


def mc_forward_process(
    seq: torch.Tensor, prompt_length: int, *, mask_id: int = MASK_ID,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Monte-Carlo estimator's noising: for b samples of one sequence [b, Lp + T], mask
    exactly k_i random answer positions in sample i, with k_i stratified over [1, T]: a random
    start k, then evenly spaced steps of T / b, wrapped into [1, T].

    Returns noisy [b, L] int64, masked [b, L] bool and the mask ratio k_i / T, [b] float32.
    """
    b, L = seq.shape
    T = L - prompt_length
    device = seq.device
    k = torch.randint(1, T + 1, (), device=device, generator=generator)
    counts = torch.round(torch.linspace(0, (b - 1) * (T / b), b, device=device) + k).long()
    counts = (counts - 1) % T + 1
    # The counts[i] positions with the smallest random keys: a uniform k-subset per row.
    keys = torch.rand((b, T), device=device, generator=generator)
    rank = keys.argsort(-1).argsort(-1)
    masked = torch.zeros((b, L), dtype=torch.bool, device=device)
    masked[:, prompt_length:] = rank < counts[:, None]
    return torch.where(masked, mask_id, seq), masked, counts.float() / T


@torch.no_grad()
def get_log_likelihood(
    model: Callable[[torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,
    answer: torch.Tensor,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    mask_id: int = MASK_ID,
    *,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> float:
    """Monte-Carlo estimate of log p(answer | prompt), as LLaDA's get_log_likelihood.

    Args:
        model: maps token ids [b, l] to logits [b, l, V] (or to an object with .logits).
        prompt: [Lp] int64; answer: [T] int64, T >= 1.
        mc_num: samples in all, a multiple of batch_size.
        cfg_scale: classifier-free guidance; the unconditional pass masks the whole prompt and
            the logits become un + (cfg_scale + 1) * (cond - un).

    Per sample: sum over masked answer positions of CE / (k / T). The estimate is minus their
    mean. One host sync, at the end.
    """
    if mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size})")
    if answer.numel() < 1:
        raise ValueError("answer must hold at least one token")
    Lp = prompt.numel()
    seq = torch.cat([prompt, answer])[None].expand(batch_size, -1)
    total = torch.zeros((), dtype=torch.float32, device=seq.device)
    for _ in range(mc_num // batch_size):
        noisy, masked, ratio = mc_forward_process(seq, Lp, mask_id=mask_id, generator=generator)
        if cfg_scale > 0:
            uncond = noisy.clone()
            uncond[:, :Lp] = mask_id
            logits = _logits(model, torch.cat([noisy, uncond]))
            cond, un = logits.chunk(2)
            logits = un + (cfg_scale + 1) * (cond - un)
        else:
            logits = _logits(model, noisy)
        total += masked_diffusion_loss(logits, seq, masked, ratio, backend=backend) / batch_size
    return -(total / (mc_num // batch_size)).item()


def _logits(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits
