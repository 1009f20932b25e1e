"""Eager definition of the block-diffusion training step as dFactory runs it
(inclusionAI/dFactory, tasks/train_llada2_bd.py, block_diffusion_mode with
same_token_labels): the truth `training.block_diffusion_loss_from_noise` is tested against,
and the eager baseline of the training benchmark. Transcribed in our words:

  * the mask: a dense [2L, 2L] bool over [x_t ; x_0] (its `block_diffusion_mask`), made a
    float mask of 0 and -inf, expanded over the batch and handed to SDPA in every layer;
  * the input: [x_t ; x_0] with positions [0..L-1, 0..L-1];
  * the loss: full logits [B, 2L, V], the first half kept; labels = x_0 where x_t is masked,
    -100 elsewhere; cross-entropy summed over the labelled positions and divided by their
    number.

Shapes: B batch, L sequence, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import apply_rope, rope_tables


def dfactory_mask(L: int, block_size: int) -> torch.Tensor:
    """[2L, 2L] bool, True = attend. Query i and key j are "clean" when >= L; their block is
    (index mod L) // block_size. Visible: same block and same half; or a noisy query and a
    clean key of an earlier block; or a clean query and a clean key of a block <= its own."""
    idx = torch.arange(2 * L)
    clean = idx >= L
    block = torch.where(clean, idx - L, idx) // block_size
    qc, kc = clean[:, None], clean[None, :]
    qb, kb = block[:, None], block[None, :]
    diagonal = (qb == kb) & (qc == kc)
    offset_causal = (qb > kb) & kc & ~qc
    causal = (qb >= kb) & kc & qc
    return diagonal | offset_causal | causal


def float_mask(mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[2L, 2L] bool -> [1, 1, 2L, 2L] float: 0 where visible, -inf elsewhere."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, float("-inf"))[None, None]


def eager_hidden(model, x, bias, position_ids):
    """An LLaDAModel's forward written out with SDPA and a dense float bias [B or 1, 1, Lq,
    Lk]: x [B, L] int64, position_ids [L] -> hidden states after ln_f [B, L, D]."""
    t, cfg = model.model.transformer, model.config
    B, L = x.shape
    cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, int(position_ids.max()) + 1, x.device)
    cos, sin = cos[position_ids], sin[position_ids]
    h = t.wte(x)
    for blk in t.blocks:
        n = blk.attn_norm(h)
        q = blk.q_proj(n).view(B, L, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = blk.k_proj(n).view(B, L, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = blk.v_proj(n).view(B, L, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), enable_gqa=True)
        h = h + blk.attn_out(a.transpose(1, 2).reshape(B, L, -1))
        m = blk.ff_norm(h)
        h = h + blk.ff_out(F.silu(blk.ff_proj(m)) * blk.up_proj(m))
    return t.ln_f(h)


def dfactory_loss(model, noisy, clean, masked, block_size, logits_fn=None):
    """dFactory's block-diffusion loss of one micro-batch: noisy, clean [B, L] int64, masked
    [B, L] bool (labels are clean there, -100 elsewhere). logits_fn(x [B, 2L], bias, pos)
    gives the full logits [B, 2L, V]; the default runs an LLaDAModel eagerly. Returns the
    float32 scalar loss."""
    B, L = noisy.shape
    bias = float_mask(dfactory_mask(L, block_size).to(noisy.device)).expand(B, -1, -1, -1)
    pos = torch.arange(L, device=noisy.device).repeat(2)
    x = torch.cat([noisy, clean], 1)
    if logits_fn is None:
        logits = model.lm_head(eager_hidden(model, x, bias, pos))
    else:
        logits = logits_fn(x, bias, pos)
    noisy_logits = logits[:, :L].float()
    labels = torch.where(masked, clean, -100)
    ce = F.cross_entropy(noisy_logits.reshape(-1, noisy_logits.shape[-1]), labels.reshape(-1),
                         reduction="none")
    return ce.sum() / (labels != -100).sum()
