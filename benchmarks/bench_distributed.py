"""Vocabulary parallelism: our statistics exchange against all-gathering the logits, at LLaDA's
V = 126464 split over W = 2 ranks (gloo on this machine; the same code runs on NCCL).

    python benchmarks/bench_distributed.py          # starts W processes itself (spawn)

Per op, two ways to the same result on every rank:
    stats_exchange     the vocabulary-parallel op (group=, vocab_offset=): each rank scores its
                       shard and the ranks all-gather O(B x L) statistics
    all_gather_logits  all-gather the [B, L, V_r] logit shards, then the single-device op on
                       [B, L, V] on every rank (the loss: its gradient sliced back to the shard)
Measured: the bytes each rank contributes to the all-gather(s) of one step (counted at the
collective, so the layout check and the loss's backward are included if they exchange
anything), and the step's time: per iteration the slowest rank's (a barrier first), median and
20/80 % quantiles over the iterations.

Rows go into benchmarks/results/results.csv (provider = the way, the exchanged bytes per rank
in the shape column, speedup_vs_eager left empty: neither way is an eager baseline) with the
machine; benchmarks/run.py keeps them (it has nothing to collect here: no pytest tests).
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
if (HERE.parent / "llada_kernels").is_dir():  # a source checkout: its package, not an installed one
    sys.path.insert(0, str(HERE.parent))
V, W = 126464, 2
ITERS = int(os.environ.get("LLADA_BENCH_ITERS", "10"))


def _count_bytes():
    """Wraps the collectives the ops and the baseline use; returns the running byte count."""
    from llada_kernels.distributed import _exchange

    sent = [0]
    inner = _exchange._all_gather_single

    def counting(out, t, **kw):
        sent[0] += t.numel() * t.element_size()
        return inner(out, t, **kw)

    _exchange._all_gather_single = counting
    return sent, counting


def _timed(fn, group, sent):
    """(median, p20, p80) of the slowest rank's time per call, in ms, and bytes sent per call."""
    fn()  # warm-up (and the Triton/parallel pools)
    before = sent[0]
    fn()
    per_call = sent[0] - before
    times = []
    for _ in range(ITERS):
        dist.barrier(group)
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, dist.ReduceOp.MAX, group=group)
        times.append(t.item() * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return statistics.median(times), q[0], q[3], per_call


def _remask_cases(gather):
    """(op, provider, shape, dtype, fn): one LLaDA sampling step, a 256-token answer, every
    position masked."""
    import llada_kernels as lk
    from llada_kernels.distributed import vocab_range

    group = dist.group.WORLD
    lo, hi = vocab_range(V, group)
    g = torch.Generator().manual_seed(0)  # the same whole-vocabulary logits on every rank
    B, L, mask = 1, 256, 126336
    full = (torch.randn(B, L, V, generator=g) * 4).to(torch.bfloat16)
    shard = full[..., lo:hi].contiguous()
    x = torch.full((B, L), mask)
    k = torch.full((B,), 8)
    kw = dict(mask_id=mask, temperature=0.7, remasking="low_confidence")

    def remask_vp():
        return lk.remask_step(shard, x, k, generator=torch.Generator().manual_seed(1),
                              group=group, vocab_offset=lo, **kw)

    def remask_gather():
        logits = gather(shard)
        return lk.remask_step(logits, x, k, generator=torch.Generator().manual_seed(1), **kw)

    shape = f"B={B} L={L} V={V} W={W}"
    return [("remask_step", "stats_exchange", shape, "bfloat16", remask_vp),
            ("remask_step", "all_gather_logits", shape, "bfloat16", remask_gather)]


def _loss_cases(gather):
    """masked_diffusion_loss, forward and backward: a 512-token pre-training row, half masked."""
    import llada_kernels as lk
    from llada_kernels.distributed import vocab_range

    group = dist.group.WORLD
    lo, hi = vocab_range(V, group)
    g = torch.Generator().manual_seed(1)
    B, L = 1, 512
    full = torch.randn(B, L, V, generator=g).to(torch.bfloat16)
    shard = full[..., lo:hi].contiguous()
    targets = torch.randint(0, V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    p_mask = torch.full((B, L), 0.5)

    def loss_vp():
        logits = shard.detach().requires_grad_()
        lk.masked_diffusion_loss(logits, targets, masked, p_mask, group=group,
                                 vocab_offset=lo).backward()
        return logits.grad

    def loss_gather():
        logits = gather(shard).requires_grad_()
        lk.masked_diffusion_loss(logits, targets, masked, p_mask).backward()
        return logits.grad[..., lo:hi]

    shape = f"B={B} L={L} V={V} W={W} fwd+bwd"
    return [("masked_diffusion_loss", "stats_exchange", shape, "bfloat16", loss_vp),
            ("masked_diffusion_loss", "all_gather_logits", shape, "bfloat16", loss_gather)]


def _worker(rank, port, queue):
    try:
        _measure(rank, port, queue)
    except BaseException:  # noqa: BLE001  (the parent prints it and stops)
        import traceback
        queue.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def _measure(rank, port, queue):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=W, timeout=datetime.timedelta(seconds=600))
    from llada_kernels.distributed import _exchange

    sent, _ = _count_bytes()

    def gather(shard):  # [B, L, V_r] on every rank -> [B, L, V] (even split: equal V_r)
        parts = _exchange.all_gather(shard.reshape(-1, shard.shape[-1]), dist.group.WORLD)
        return parts.permute(1, 0, 2).reshape(*shard.shape[:-1], -1)

    rows = []
    for op, provider, shape, dtype, fn in _remask_cases(gather) + _loss_cases(gather):
        median, p20, p80, sent_bytes = _timed(fn, dist.group.WORLD, sent)
        rows.append(dict(op=op, provider=provider, shape=f"{shape}, {_kib(sent_bytes)} sent/rank",
                         dtype=dtype, device="cpu", median_ms=median, p20_ms=p20, p80_ms=p80,
                         sent_bytes=sent_bytes))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def _kib(n):
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def main():
    sys.path.insert(0, str(HERE))
    import run  # benchmarks/run.py: the CSV's columns and merge
    from _common import isa, machine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(W)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=3600)
    for p in procs:
        p.join()
    if isinstance(rows, str):
        raise RuntimeError(f"a rank failed:\n{rows}")
    cpu = torch.device("cpu")
    for r in rows:
        print(f"{r['op']:24s} {r['provider']:18s} {r['shape']:55s} "
              f"{r['median_ms']:9.2f} ms  (p20 {r['p20_ms']:.2f}, p80 {r['p80_ms']:.2f})")
        r.update(gb_per_s=None, tflop_per_s=None, peak_extra_mb=None, speedup_vs_eager=None,
                 speedup_vs_sdpa=None, note=f"gloo, {W} processes x 1 thread",
                 machine=machine(cpu), isa=isa(cpu))
        del r["sent_bytes"]
    print(machine(cpu), isa(cpu))
    path = run.RESULTS / "results.csv"
    merged = run.merge(rows, path)
    run.write_csv(merged, path)
    (run.RESULTS / "results.md").write_text(run.markdown(merged) + "\n")


if __name__ == "__main__":
    main()
