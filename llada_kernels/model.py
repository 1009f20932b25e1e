"""LLaDA, the masked diffusion LM, as a small readable PyTorch model on llada_kernels' ops.

The architecture is LLaDA-8B's (the released `modeling_llada.py`, llama block type): RMSNorm,
NeoX-style RoPE, SwiGLU, optional grouped KV heads, and attention with no causal mask. The
module tree reproduces the released parameter names exactly (`model.transformer.wte.weight`,
`model.transformer.blocks.{i}.q_proj.weight`, ...), so a released state dict loads as is.

Shapes: B batch, L sequence, P cached prefix, D d_model, H query heads, Hkv key/value heads,
Dh head dim, F mlp hidden size, V vocabulary (embedding_size rows).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import checkpoint as ckpt
from ._checks import check_index, values_checked
from .constants import EOS_ID, MASK_ID, VOCAB_SIZE
from .ops.attention import attention

# Released config fields that name an architecture choice, with the value this model
# implements (LLaDA-8B's). A config asking for anything else is refused rather than silently
# misread; None and False both mean "off" where the released value is one of them.
_SUPPORTED = {
    "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
    "rope_full_precision": True, "alibi": False, "input_emb_norm": False, "scale_logits": False,
    "attention_layer_norm": False, "layer_norm_with_affine": True, "bias_for_layer_norm": False,
    "block_group_size": 1, "include_bias": False, "flash_attention": False,
    "multi_query_attention": None,
}
# The released config.json's other fields, with LLaDA-8B's values. This model has no dropout
# and its own init; they are written so that the released modeling_llada.py, which reads them
# (with GPT-2's defaults, dropouts of 0.1, where they are absent), builds the same model.
_RELEASED = {
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "alibi_bias_max": 8.0,
    "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0,
    "attention_layer_norm_with_affine": True, "init_device": "meta", "init_fn": "mitchell",
    "init_std": 0.02, "init_cutoff_factor": None, "precision": "amp_bf16", "use_cache": False,
}
# What lets transformers' AutoModel(..., trust_remote_code=True) find the released files
# configuration_llada.py and modeling_llada.py when they sit beside the checkpoint.
AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}


@dataclass
class LLaDAConfig:
    """The fields of LLaDA's released `config.json` that the model reads, by their names, with
    LLaDA-8B's values as defaults. Every other field is kept in `extra` (and written back by
    `to_dict`). Values are checked: types, ranges, and the ids inside the vocabulary."""

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None        # None = n_heads
    n_layers: int = 32
    mlp_hidden_size: int | None = 12288  # None = mlp_ratio * d_model
    mlp_ratio: int = 4
    vocab_size: int = VOCAB_SIZE
    embedding_size: int | None = VOCAB_SIZE  # rows of wte / ff_out (>= vocab_size); None = vocab_size
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = MASK_ID
    eos_token_id: int = EOS_ID
    pad_token_id: int = EOS_ID
    weight_tying: bool = False
    include_qkv_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name, want in _SUPPORTED.items():
            got = self.extra.get(name, want)
            if got != want and not (want in (None, False) and not got):
                raise ValueError(f"LLaDAConfig: {name}={got!r} is not supported (this model "
                                 f"implements {name}={want!r}, as LLaDA-8B)")
        for name in ("d_model", "n_heads", "n_layers", "mlp_ratio", "vocab_size", "max_sequence_length"):
            _positive_int(name, getattr(self, name))
        for name in ("n_kv_heads", "mlp_hidden_size", "embedding_size"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        for name in ("weight_tying", "include_qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                _bad(f"{name} must be a bool; got {getattr(self, name)!r}", TypeError)
        self.rope_theta = _positive_float("rope_theta", self.rope_theta)
        self.rms_norm_eps = _positive_float("rms_norm_eps", self.rms_norm_eps)
        if self.rows < self.vocab_size:
            _bad(f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                _bad(f"{name} must be an int; got {value!r}", TypeError)
            if not 0 <= value < self.vocab_size:
                _bad(f"{name}={value} is outside the vocabulary [0, vocab_size={self.vocab_size})")
        if self.d_model % self.n_heads:
            _bad(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            _bad(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            _bad(f"the head dim d_model / n_heads = {self.head_dim} must be even for RoPE")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def rows(self) -> int:
        return self.embedding_size or self.vocab_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLaDAConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self, *, auto_map: bool = False) -> dict[str, Any]:
        """Every field of the released config.json (LLaDA-8B's values where this config does
        not say otherwise), then `extra`, then the fields above. auto_map: add AUTO_MAP."""
        out = {**_SUPPORTED, **_RELEASED, **({"auto_map": AUTO_MAP} if auto_map else {})}
        out.update(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "extra"})
        return out


def _bad(msg: str, exc: type[Exception] = ValueError):
    raise exc(f"LLaDAConfig: {msg}")


def _positive_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(f"{name} must be an int; got {value!r} ({type(value).__name__})", TypeError)
    if value < 1:
        _bad(f"{name} must be >= 1; got {value}")


def _positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _bad(f"{name} must be a number; got {value!r} ({type(value).__name__})", TypeError)
    if not (math.isfinite(value) and value > 0):
        _bad(f"{name} must be finite and > 0; got {value}")
    return float(value)


@dataclass
class LLaDAOutput:
    logits: torch.Tensor                          # [B, L, V]
    hidden_states: torch.Tensor | None = None     # [B, L, D], after ln_f


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back to x's dtype, then times the weight (as released)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(head_dim: int, theta: float, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, Dh] in fp32 for positions 0..length-1 (NeoX layout: both halves share
    a frequency)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim)
    freqs = torch.outer(torch.arange(length, device=device, dtype=torch.float), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(t, cos, sin):
    """t [B, H, L, Dh] rotated in fp32 by cos/sin [L, Dh] (or [B, 1, L, Dh]: per-row
    positions); returned in t's dtype."""
    t32 = t.float()
    t1, t2 = t32.chunk(2, dim=-1)
    rotated = torch.cat((-t2, t1), dim=-1)
    return (t32 * cos + rotated * sin).to(t.dtype)


def _check_positions(positions, B: int, L: int, device):
    """hidden_states' output_positions -> None, a slice with step 1, a [B, n] int64 index or
    a [B, L] bool mask."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        start, stop, step = positions.indices(L)
        if step != 1:
            raise ValueError(f"LLaDAModel: output_positions as a slice must have step 1; "
                             f"got {positions}")
        return slice(start, max(start, stop))
    if not isinstance(positions, torch.Tensor):
        raise TypeError("LLaDAModel: output_positions must be None, a slice, a [B, n] int64 "
                        f"tensor or a [B, L] bool tensor; got {type(positions).__name__}")
    if positions.device != device:
        raise ValueError(f"LLaDAModel: output_positions is on {positions.device} but input_ids "
                         f"is on {device}")
    if positions.dtype == torch.bool:
        if tuple(positions.shape) != (B, L):
            raise ValueError(f"LLaDAModel: output_positions as a bool mask must have the shape "
                             f"of input_ids {[B, L]}; got {list(positions.shape)}")
        return positions
    if positions.dtype != torch.int64 or positions.dim() != 2 or positions.shape[0] != B:
        raise ValueError(f"LLaDAModel: output_positions must be a [B, n] = [{B}, n] int64 index "
                         f"or a [B, L] = {[B, L]} bool mask; got "
                         f"{str(positions.dtype).removeprefix('torch.')} of shape "
                         f"{list(positions.shape)}")
    if values_checked() and positions.numel() and bool(((positions < 0) | (positions >= L)).any()):
        bad = positions[(positions < 0) | (positions >= L)][0].item()
        raise ValueError(f"LLaDAModel: output_positions holds {bad}, outside the positions "
                         f"[0, {L}) of input_ids")
    return positions


class LLaDABlock(nn.Module):
    """h = x + attn_out(attention(rope(q), rope(k), v)) on attn_norm(x);
    y = h + ff_out(silu(ff_proj(m)) * up_proj(m)) with m = ff_norm(h)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        D, Dh, F_ = cfg.d_model, cfg.head_dim, cfg.hidden_size
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, Dh
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(D, cfg.n_heads * Dh, bias=cfg.include_qkv_bias)
        self.k_proj = nn.Linear(D, cfg.kv_heads * Dh, bias=cfg.include_qkv_bias)
        self.v_proj = nn.Linear(D, cfg.kv_heads * Dh, bias=cfg.include_qkv_bias)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.ff_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(D, F_, bias=False)  # the SwiGLU gate
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.ff_out = nn.Linear(F_, D, bias=False)

    def forward(self, x, cos, sin, key_mask, past_kv=None, backend=None, rows=None):
        """x [B, L, D]; cos/sin [L, Dh] for x's positions; key_mask [B, P+L] bool or None;
        past_kv: (k, v) [B, Hkv, P, Dh] of a cached prefix; rows: the output rows, as
        LLaDAModel.hidden_states' output_positions (None, a slice, a [B, n] int64 index or a
        [B, L] bool mask). Returns y [B, n, D] ([B, L, D] without rows; [N, D], the mask's
        rows in order, with a bool mask) and this layer's (k, v) [B, Hkv, P+L, Dh], which
        always cover every position."""
        B, L, D = x.shape
        n = self.attn_norm(x)
        k = self.k_proj(n).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
        v = self.v_proj(n).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
        k = apply_rope(k, cos, sin)
        if past_kv is not None:
            k = torch.cat((past_kv[0], k), dim=2)                                       # [B, Hkv, P+L, Dh]
            v = torch.cat((past_kv[1], v), dim=2)
        # Queries only for the output rows. A bool mask selects a different number of rows
        # per sequence: its queries stay [B, H, L, Dh] and the rows are picked after attention.
        if isinstance(rows, slice):
            x, n, cos, sin = x[:, rows], n[:, rows], cos[rows], sin[rows]
        elif rows is not None and rows.dtype != torch.bool:  # [B, nq] positions
            at = rows[..., None].expand(-1, -1, D)
            x, n = x.gather(1, at), n.gather(1, at)
            cos, sin = cos[rows][:, None], sin[rows][:, None]                           # [B, 1, nq, Dh]
        Lq = x.shape[1]
        q = self.q_proj(n).view(B, Lq, self.n_heads, self.head_dim).transpose(1, 2)   # [B, H, Lq, Dh]
        q = apply_rope(q, cos, sin)
        a = attention(q, k, v, key_padding_mask=key_mask, backend=backend)               # [B, H, Lq, Dh]
        a = a.transpose(1, 2).reshape(B, Lq, D)
        if rows is not None and not isinstance(rows, slice) and rows.dtype == torch.bool:
            x, a = x[rows], a[rows]                                                     # [N, D]
        h = x + self.attn_out(a)
        m = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m)), (k, v)


class _Backbone(nn.Module):
    """Holds `transformer` so that parameter names start with `model.transformer.`."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.rows, cfg.d_model),
            blocks=nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        ))
        if not cfg.weight_tying:
            self.transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.rows, bias=False)


class LLaDAModel(nn.Module):
    """LLaDA's mask predictor.

    `model(input_ids, attention_mask=None).logits` is [B, L, V], as the released model, so
    LLaDA's own `generate.py` and `get_log_likelihood.py` run on it unchanged. The sampler and
    the trainer use `hidden_states` and `lm_head` instead, to produce logits only where needed.

    Attributes:
        backend: the backend of the attention op (None = its default; "reference" = eager).
        gradient_checkpointing: recompute each block in the backward (activation checkpointing).
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.backend: str | None = None
        self.gradient_checkpointing = False
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    # ---- parameters ------------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02):
        """Normal(0, std) weights, residual projections scaled by 1/sqrt(2 n_layers); norms 1."""
        if self.model.transformer.wte.weight.is_meta:
            return
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                residual = ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight"))
                nn.init.normal_(p, std=out_std if residual else std)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D]: ff_out's weight, or wte's with weight_tying."""
        t = self.model.transformer
        return t.wte.weight if self.config.weight_tying else t.ff_out.weight

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] (after ln_f) -> logits [..., V] in the model dtype."""
        return F.linear(hidden, self.lm_head_weight)

    # ---- forward ---------------------------------------------------------------------------
    def _rope_for(self, start: int, length: int, device):
        end = start + length
        if self._rope is None or self._rope[0].shape[0] < end or self._rope[0].device != device:
            n = max(end, min(self.config.max_sequence_length, 2 * end))
            with torch.inference_mode(False):  # built while sampling, still usable in training
                self._rope = rope_tables(self.config.head_dim, self.config.rope_theta, n, device)
        cos, sin = self._rope
        return cos[start:end], sin[start:end]

    def hidden_states(self, input_ids, attention_mask=None, *, past_kv=None, return_kv=False,
                      output_positions=None, check_ids=True):
        """Hidden states after ln_f, without the lm_head.

        Args:
            input_ids: [B, L] int64, at positions P..P+L-1 (P = 0 without past_kv).
            attention_mask: [B, P+L] (bool, or ints 1 = token, 0 = padding) or None. A
                key-padding mask: padded keys are hidden from every query. No [B, 1, L, L]
                bias is built.
            past_kv: per layer (k, v) [B, Hkv, P, Dh] of positions 0..P-1, from an earlier call
                with return_kv=True (the sampler's prefix cache).
            return_kv: also return every layer's (k, v) [B, Hkv, P+L, Dh].
            output_positions: the rows of hidden to return: None (all L); a slice of 0..L-1
                with step 1 (n = its length); a [B, n] int64 tensor of indices into 0..L-1
                (row b's own rows; repeats allowed); or a [B, L] bool mask, which returns
                hidden[mask] flattened, [N, D] (N = mask.sum(); boolean indexing, so one host
                synchronisation on an accelerator). Exact, and cheaper: every layer but the
                last needs all L rows (attention mixes them), but the last one computes its
                attn_out and MLP (and, but for a bool mask, its queries and attention) only
                for the output rows, against keys and values of all P+L positions. The
                sampler asks for its logits window, the trainer for the masked rows.
            check_ids: check that every id is in [0, embedding_size) (a value check: one host
                synchronisation on an accelerator; see llada_kernels._checks). The sampler,
                which checks its ids once, passes False.

        Returns:
            hidden [B, n, D] (n = L without output_positions; [N, D] for a bool mask), or
            (hidden, kv) with return_kv.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
                or input_ids.dtype not in (torch.int64, torch.int32):
            got = (f"{str(input_ids.dtype).removeprefix('torch.')} tensor of shape {list(input_ids.shape)}"
                   if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__)
            raise TypeError(f"LLaDAModel: input_ids must be a [B, L] int64 tensor; got {got}")
        if check_ids:
            check_index("LLaDAModel", "input_ids", input_ids, self.config.rows)
        B, L = input_ids.shape
        P = 0 if past_kv is None else past_kv[0][0].shape[2]
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)
        if key_mask is not None and key_mask.shape != (B, P + L):
            raise ValueError(f"LLaDAModel: attention_mask must have shape {[B, P + L]}; "
                             f"got {list(attention_mask.shape)}")
        rows = _check_positions(output_positions, B, L, input_ids.device)
        x = self.model.transformer.wte(input_ids)                                    # [B, L, D]
        cos, sin = self._rope_for(P, L, x.device)                                   # [L, Dh]
        blocks = self.model.transformer.blocks
        kv = []
        for i, block in enumerate(blocks):
            past = None if past_kv is None else past_kv[i]
            last_rows = rows if i == len(blocks) - 1 else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, layer_kv = checkpoint(block, x, cos, sin, key_mask, past, self.backend,
                                         last_rows, use_reentrant=False)
            else:
                x, layer_kv = block(x, cos, sin, key_mask, past, self.backend, last_rows)
            if return_kv:
                kv.append(layer_kv)
        h = self.model.transformer.ln_f(x)
        return (h, kv) if return_kv else h

    def forward(self, input_ids, attention_mask=None, **unused) -> LLaDAOutput:
        """input_ids [B, L] -> LLaDAOutput(logits [B, L, V]). Extra keyword arguments of the
        released forward (use_cache=False, ...) are accepted and ignored."""
        h = self.hidden_states(input_ids, attention_mask)
        return LLaDAOutput(logits=self.lm_head(h), hidden_states=h)

    # ---- checkpoints -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, torch_dtype=None) -> LLaDAModel:
        """Load a local folder in the released format (config.json + safetensors; see
        llada_kernels.checkpoint). Only files inside `path` are read; every error is a
        CheckpointError naming the file and, where one is at fault, the tensor.

        dtype (or torch_dtype, transformers' name): cast every tensor to it; None keeps the
        checkpoint's (which must then be one dtype). device: where the parameters go (cpu)."""
        raw = ckpt.read_config(path)
        try:
            config = LLaDAConfig.from_dict(raw)
        except (TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{Path(path).resolve() / ckpt.CONFIG}: {e}") from e
        with torch.device("meta"):
            model = cls(config)  # no memory: every parameter is assigned from the checkpoint
        tensors = ckpt.read_tensors(path, model.state_dict(), dtype=dtype or torch_dtype,
                                    device=device)
        model.load_state_dict(tensors, assign=True)
        return model.eval()

    def save_pretrained(self, path, *, max_shard_size: int | str = "5GB", auto_map: bool = False):
        """Write config.json (every field of the released config, LLaDA's values where ours
        do not differ: dropouts 0, ...) and safetensors with the released parameter names,
        sharded above max_shard_size. auto_map=True also writes `auto_map`, so that
        transformers' trust_remote_code finds LLaDA's configuration_llada.py and
        modeling_llada.py once you put them in the folder."""
        ckpt.save(path, self.config.to_dict(auto_map=auto_map), self.state_dict(),
                  max_shard_size=max_shard_size)
