"""The trainer's losses under data parallelism: DDP and FSDP2 (`fully_shard`), with activation
checkpointing. torch.distributed does the work; this file only puts the loss inside a module's
forward, where DDP's and FSDP2's hooks can see it.

    model = LLaDAModel(config)                        # the same initial weights on every rank
    step = wrap_ddp(model, "pretrain")                # or wrap_fsdp2(model, "sft")
    loss = step(input_ids)                            # this rank's micro-batch [B, L]
    loss.backward()                                   # gradients averaged over the ranks
    optimizer.step()                                  # over step.parameters()

Why a module: `training.pretrain_loss(model, ...)` calls `model.hidden_states` and reads the
lm_head weight itself (the fused loss never forms [B, L, V] logits), so `DDP(model)` or
`fully_shard(model)` would never see a forward: DDP would not arm its gradient all-reduce, and
FSDP2 would not all-gather the root's parameters (embedding, ln_f, lm_head). `TrainingLoss`
makes "model + loss" one module whose forward returns the loss.

The gradients are those of the single-process run that averages the ranks' losses: DDP and
FSDP2 average the gradients over the W ranks. How each loss is normalised so that this average
is the loss of the whole global batch:

  * "pretrain" and "sft" (LLaDA 1): a mean over the rank's own micro-batch (/ (B * L), / B), so
    the ranks' micro-batches must have the same shape; their mean is then the global batch's.
  * "block_diffusion" (training.block_diffusion_loss, the 2L objective, with complementary
    masking, packed documents, either loss_weight and normalize): its divisor Z (the number of
    masked or maskable tokens) depends on the noise, so a per-rank mean would weight the ranks
    unequally. The wrappers pass dp_group= (their group): Z is counted over all ranks (one
    all-reduce of one int64 per step) and rank r returns W * S_r / Z (S_r its sum of w * CE);
    the ranks' mean is sum_r S_r / Z, the single-process loss of the concatenated micro-batches,
    which may differ in size. Each rank draws its own noise: seed each rank's generator.

    step = wrap_ddp(model, "block_diffusion")         # LLaDAModel(LLaDAConfig(block_size=...))
    loss = step(input_ids, complementary=True, document_ids=doc_ids, generator=g)

tests/test_distributed_training.py checks both under DDP and FSDP2, checkpointing on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import training

LOSSES: dict[str, Callable] = {"pretrain": training.pretrain_loss, "sft": training.sft_loss,
                               "block_diffusion": training.block_diffusion_loss}


class TrainingLoss(nn.Module):
    """model and a loss as one module: forward(*args, **kwargs) = loss(model, *args, **kwargs).

    loss: "pretrain" (training.pretrain_loss: forward(input_ids [B, L], *, generator=...)),
    "sft" (training.sft_loss: forward(input_ids [B, L], prompt_lengths [B], ...)),
    "block_diffusion" (training.block_diffusion_loss: forward(input_ids [B, L], *,
    complementary=..., document_ids=..., generator=..., ...), given dp_group=group), or any
    callable taking the model first and returning a scalar tensor (a loss on logits; pass a
    block-diffusion loss its dp_group yourself). Returns that scalar.
    group: the data-parallel process group, for the losses whose divisor is counted over all
    ranks ("block_diffusion"); None: each rank's own count (one process).
    """

    def __init__(self, model: nn.Module, loss: str | Callable = "pretrain", *, group=None):
        super().__init__()
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"TrainingLoss: loss must be one of {sorted(LOSSES)} or a "
                                 f"callable; got {loss!r}")
            if loss == "block_diffusion" and group is not None:
                loss = functools.partial(LOSSES[loss], dp_group=group)
            else:
                loss = LOSSES[loss]
        elif not callable(loss):
            raise TypeError(f"TrainingLoss: loss must be a str or a callable; got "
                            f"{type(loss).__name__}")
        self.model = model
        self.loss_fn = loss

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.loss_fn(self.model, *args, **kwargs)


def wrap_ddp(model: nn.Module, loss: str | Callable = "pretrain", *,
             activation_checkpointing: bool = True, process_group=None, **ddp_kwargs):
    """DistributedDataParallel over TrainingLoss(model, loss); call it as the loss.

    model: an LLaDAModel (or any module with `gradient_checkpointing` or
    `gradient_checkpointing_enable()`), on this rank's device, the same weights on every rank.
    activation_checkpointing: recompute each transformer block in the backward.
    process_group and ddp_kwargs go to DistributedDataParallel (device_ids for one GPU per
    process, ...)."""
    _require_dist("wrap_ddp")
    set_activation_checkpointing(model, activation_checkpointing)
    group = dist.group.WORLD if process_group is None else process_group
    return nn.parallel.DistributedDataParallel(TrainingLoss(model, loss, group=group),
                                               process_group=process_group, **ddp_kwargs)


def wrap_fsdp2(model: nn.Module, loss: str | Callable = "pretrain", *,
               activation_checkpointing: bool = True, mesh=None, group=None, **fsdp_kwargs):
    """FSDP2: `fully_shard` on each transformer block, then on TrainingLoss(model, loss) (the
    root: embedding, ln_f and lm_head). Returns the root; call it as the loss. Parameters become
    DTensors sharded over the mesh (`p.full_tensor()` gathers one).

    mesh: a 1-D DeviceMesh, or None: built from `group` (None = the default group) on the
    model's device type. fsdp_kwargs go to fully_shard (mp_policy, reshard_after_forward, ...).
    """
    _require_dist("wrap_fsdp2")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        device_type = next(model.parameters()).device.type
        mesh = DeviceMesh.from_group(group or dist.group.WORLD, device_type)
    elif group is not None:
        raise ValueError("wrap_fsdp2: pass mesh or group, not both")
    set_activation_checkpointing(model, activation_checkpointing)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, **fsdp_kwargs)
    root = TrainingLoss(model, loss, group=mesh.get_group())
    fully_shard(root, mesh=mesh, **fsdp_kwargs)
    return root


def global_count(op: str, count: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """(count summed over the group's ranks, W): a loss's divisor counted over every rank's
    micro-batch. count: this rank's, an integer scalar tensor (any device the group's backend
    takes). One all-reduce; every rank of `group` must call it."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: dp_group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{op}: dp_group must be a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD); got {type(group).__name__}")
    total = count.detach().clone()
    dist.all_reduce(total, group=group)
    return total, dist.get_world_size(group)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an LLaDAModel or a released LLaDAModelLM
    (model.model.transformer.blocks), FSDP2's unit of sharding."""
    t = getattr(getattr(model, "model", model), "transformer", None)
    blocks = None if t is None else getattr(t, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .model.transformer.blocks (an "
                        "LLaDAModel or LLaDA's modeling_llada.py); shard it with fully_shard "
                        "yourself and wrap TrainingLoss(model, loss)")
    return list(blocks)


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each block in the backward: LLaDAModel.gradient_checkpointing, or a
    transformers model's gradient_checkpointing_enable()/disable()."""
    if hasattr(model, "gradient_checkpointing") and not callable(model.gradient_checkpointing):
        model.gradient_checkpointing = bool(on)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable() if on else model.gradient_checkpointing_disable()
    elif on:
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing switch; pass "
                        "activation_checkpointing=False or wrap its blocks in "
                        "torch.utils.checkpoint yourself")


def _require_dist(op: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialised (call "
                           "torch.distributed.init_process_group first, or run under torchrun)")
