"""llada-kernels past one process, on torch.distributed (no engine of our own).

Vocabulary parallelism (tensor-parallel lm_head): the ops take a process group and the first
id of this rank's shard, and exchange O(rows) statistics instead of logits:

    masked_diffusion_loss(logits_shard, ..., group=g, vocab_offset=off)          # [B, L, V_r]
    fused_linear_masked_diffusion_loss(hidden, weight_shard, ..., group=g, vocab_offset=off)
    remask_step(logits_shard, x, k, ..., group=g, vocab_offset=off)

`vocab_range(V, group)` gives an even split. Data parallelism: `TrainingLoss`, `wrap_ddp` and
`wrap_fsdp2` run the trainer's losses under DDP and FSDP2 with activation checkpointing.
Context parallelism: see README, "Past one process".
"""

from __future__ import annotations

import importlib

import torch.distributed as dist

from ._exchange import Layout

__all__ = ["vocab_range", "Layout", "TrainingLoss", "wrap_ddp", "wrap_fsdp2"]

_LAZY = {"TrainingLoss": "data_parallel", "wrap_ddp": "data_parallel", "wrap_fsdp2": "data_parallel"}


def vocab_range(vocab_size: int, group=None, *, rank: int | None = None,
                world_size: int | None = None) -> tuple[int, int]:
    """[start, end) of a rank's shard when `vocab_size` ids are split as evenly as possible
    over W ranks (the first vocab_size % W ranks hold one id more). rank (the group rank) and
    world_size default to this process's in `group`; pass vocab_offset=start to the ops."""
    W = dist.get_world_size(group) if world_size is None else world_size
    r = dist.get_rank(group) if rank is None else rank
    if not 0 <= r < W or vocab_size < W:
        raise ValueError(f"vocab_range: need 0 <= rank < W <= vocab_size; got rank {r}, "
                         f"W = {W}, vocab_size = {vocab_size}")
    base, extra = divmod(vocab_size, W)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def __getattr__(name):  # the training wrappers import the model code: load them on first use
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
