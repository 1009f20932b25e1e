"""Worker processes for the distributed tests (tests/test_distributed*.py).

Three processes are started once per test session with torch.multiprocessing (spawn) and joined
into one gloo process group; `pair` is the group of ranks 0 and 1. A test hands them a
module-level function by name:

    def check_something(ctx, n):         # runs on every rank: ctx.rank, ctx.world, ctx.pair
        ...assertions...
    results = pool.run(check_something, 5)   # [rank 0's return value, rank 1's, rank 2's]

Any rank's exception fails the test with that rank's traceback. Starting the processes (each
imports torch and llada_kernels) is the slow part, done once; a task costs milliseconds of
overhead. A task that hangs (a collective some rank never joined) fails after gloo's timeout;
after any failed task the pool is restarted for the next test.
"""

from __future__ import annotations

import datetime
import importlib
import os
import queue
import socket
import traceback
from dataclasses import dataclass

import pytest
import torch.multiprocessing as mp

WORLD = 3
TIMEOUT_S = 60  # gloo's timeout inside a task; the parent waits a little longer


@dataclass
class Ctx:
    rank: int
    world: int
    pair: object  # the process group of ranks 0 and 1 (None on rank 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tasks, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # three processes on a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    pair = dist.new_group([0, 1])
    ctx = Ctx(rank, world, pair if rank < 2 else None)
    import llada_kernels  # noqa: F401  (registers the ops before the first task)
    results.put((rank, True, "ready"))
    while (item := tasks.get()) is not None:
        name, args = item
        try:
            module, qualname = name.split(":")
            fn = getattr(importlib.import_module(module), qualname)
            results.put((rank, True, fn(ctx, *args)))
        except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()
    results.close()
    results.join_thread()  # flush what this rank put, then skip the interpreter's slow teardown
    os._exit(0)


class Pool:
    def __init__(self, world=WORLD):
        spawn = mp.get_context("spawn")
        self.world = world
        self.tasks = [spawn.Queue() for _ in range(world)]
        self.results = spawn.Queue()
        self.broken = False
        port = _free_port()
        self.procs = [spawn.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results),
                                    daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()
        self._collect("start", timeout=300)

    def _collect(self, what, timeout):
        got = {}
        while len(got) < self.world:
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise TimeoutError(f"{what}: ranks {sorted(set(range(self.world)) - set(got))} "
                                   f"did not answer in {timeout} s (dead: {dead})") from None
            got[rank] = (ok, value)
        failed = {r: v for r, (ok, v) in got.items() if not ok}
        if failed:
            raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items())))
        return [got[r][1] for r in range(self.world)]

    def run(self, fn, *args):
        """fn(ctx, *args) on every rank; the list of their return values, by rank."""
        name = f"{fn.__module__}:{fn.__qualname__}"
        for q in self.tasks:
            q.put((name, args))
        try:
            return self._collect(name, timeout=TIMEOUT_S + 60)
        except BaseException:
            self.broken = True  # a rank may have died or left a collective half done
            raise

    def close(self):
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():  # stuck in a collective of a failed task
                p.kill()


_pool: Pool | None = None


@pytest.fixture(scope="session")
def _session_pool():
    yield
    if _pool is not None:
        _pool.close()


@pytest.fixture
def pool(_session_pool):
    """The session's worker pool; restarted after a failed task or a lost process. Skips the
    test where torch.distributed or its gloo backend is not built."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    global _pool
    if _pool is None or _pool.broken or not all(p.is_alive() for p in _pool.procs):
        if _pool is not None:
            _pool.close()
        _pool = Pool()
    return _pool
