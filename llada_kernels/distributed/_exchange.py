"""What crosses ranks: the argument checks of a vocabulary-parallel call, the layout check, and
the one collective that exchanges per-row statistics.

Every vocabulary-parallel op exchanges its statistics with a single all-gather: each rank
contributes [N, k] values and receives [W, N, k] (W ranks, in group order), and merges them
locally. An all-gather rather than all-reduces: one collective instead of two or three, NaN
handled by our own code (gloo's MAX drops NaN), and a merge that runs the same operations in
the same order on the same data on every rank, so that every rank's result is bitwise the same.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch
import torch.distributed as dist

from .. import _checks

# torch 2.14 renamed all_gather_into_tensor (which it deprecates) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_args(op: str, group, vocab_offset) -> int:
    """group is None (single process; vocab_offset must be 0) or an initialised ProcessGroup;
    vocab_offset an int >= 0. Returns vocab_offset as an int."""
    if group is None:
        if not (isinstance(vocab_offset, numbers.Integral) and not isinstance(vocab_offset, bool)
                and vocab_offset == 0):
            _checks.fail(op, f"vocab_offset ({vocab_offset!r}) needs group, the process group "
                             "over which the vocabulary is split; without one it must be 0")
        return 0
    if not dist.is_available() or not dist.is_initialized():
        _checks.fail(op, "group was given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group first)", RuntimeError)
    if not isinstance(group, dist.ProcessGroup):
        _checks.fail(op, f"group must be a torch.distributed.ProcessGroup (e.g. "
                         f"torch.distributed.group.WORLD or new_group(...)); got "
                         f"{type(group).__name__}", TypeError)
    return _checks.check_int(op, "vocab_offset", vocab_offset, 0, 2**62)


def world_size(group) -> int:
    return dist.get_world_size(group)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The vocabulary split of a group: offsets[i], sizes[i] of group rank i's shard."""
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def largest(self) -> int:
        return max(self.sizes)


def layout(op: str, group, vocab_offset: int, size: int, rows: int, device, *,
           name: str = "logits", active: int | None = None) -> Layout:
    """Gathers every rank's (vocab_offset, shard size, rows) and checks that the shards tile
    [0, V) without gap or overlap and that every rank passes the same number of rows (B * L).
    One small all-gather and a host synchronisation; every rank sees the same data, so every
    rank raises the same ValueError. `size` is the local shard's vocabulary (V_r >= 1).
    active: the number of rows the op will run (the fused form's chunk loop), checked equal
    on every rank too (ranks whose masked or token_weight differ would otherwise run different
    chunks and wait on each other's collectives)."""
    mine = torch.tensor([vocab_offset, size, rows, -1 if active is None else active],
                        dtype=torch.int64, device=device)
    table = all_gather(mine[None], group)[:, 0].tolist()  # [W][4]
    runs = [a for *_, a in table]
    table = [t[:3] for t in table]
    where = ", ".join(f"rank {i} holds [{o}, {o + s})" for i, (o, s, _) in enumerate(table))
    if any(s < 1 for _, s, _ in table):
        _checks.fail(op, f"every rank's {name} must hold at least one vocabulary id; {where}")
    expected = 0
    for o, s, _ in sorted(table):
        if o != expected:
            _checks.fail(op, f"the ranks' shards must tile the vocabulary [0, V) without gap or "
                             f"overlap (vocab_offset = the sizes of the shards before it); "
                             f"{where}")
        expected = o + s
    counts = [n for _, _, n in table]
    if len(set(counts)) > 1:
        _checks.fail(op, f"every rank must pass the same positions: {name} has "
                         f"{', '.join(f'{n} rows on rank {i}' for i, n in enumerate(counts))}")
    if len(set(runs)) > 1:
        _checks.fail(op, "every rank must pass the same masked and token_weight (and the same "
                         "token_weight.requires_grad): the rows to run are "
                         f"{', '.join(f'{n} on rank {i}' for i, n in enumerate(runs))}")
    return Layout(tuple(o for o, _, _ in table), tuple(s for _, s, _ in table))


def all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """t [N, ...] from every rank -> [W, N, ...], in group rank order."""
    t = t.contiguous()
    W = world_size(group)
    out = t.new_empty((W * t.shape[0],) + tuple(t.shape[1:]))  # gloo wants the ranks along dim 0
    _all_gather_single(out, t, group=group)
    return out.view((W,) + tuple(t.shape))


def pack(*tensors: torch.Tensor) -> torch.Tensor:
    """[N, k_i] tensors of any 4- or 8-byte dtypes -> one [N, sum k_i'] int32 tensor holding
    their bits (one collective for all of them)."""
    return torch.cat([t.contiguous().view(torch.int32).reshape(t.shape[0], -1) for t in tensors], 1)


def unpack(packed: torch.Tensor, *like: tuple[torch.dtype, int]) -> list[torch.Tensor]:
    """The inverse of pack on [..., N, k] int32: (dtype, columns) per tensor, in pack's order."""
    out, start = [], 0
    for dtype, cols in like:
        words = cols * torch.empty((), dtype=dtype).element_size() // 4
        out.append(packed[..., start:start + words].contiguous().view(dtype))
        start += words
    return out
