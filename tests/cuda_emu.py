"""The CUDA kernels on the host emulation (csrc/emu), for the tests.

    with EmulatedCuda() as emu:          # inside: llada::<op> on CPU tensors runs the CUDA kernel
        ...the usual test code, backend="cpu"...
    assert emu.calls["remask_step"] > 0  # and it did

The emulation library (csrc/emu/build.py) is built once per session and registers `llada_emu::<op>`
for every op that has a CUDA kernel. EmulatedCuda is a TorchDispatchMode: each `llada::<op>` call
with an emulated kernel runs that kernel twice, on clones of the inputs, under two schedules
(forward thread order, then a seeded shuffle with thread switches at random memory accesses,
whose seed changes with every call), with the hazard checker on, and fails unless both runs
give the same bits (outputs and any input written in place). Ops without a CUDA kernel (the
fused-linear composite, aten ops) run as usual, and the llada ops they call are routed again.

Errors of the emulated kernels (hazards, divergent barriers, deadlocks, traps) are
RuntimeErrors whose `{pc:0x...}` addresses are replaced by the source lines (addr2line).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
# (order, preemption probability per memory access); the seed is the call counter.
FIRST = ("forward", 0.0)
SECOND = ("random", 1 / 16)


@functools.cache
def library() -> Path:
    """Builds (if needed) and loads the emulation library; its path."""
    spec = importlib.util.spec_from_file_location("llada_emu_build", ROOT / "csrc" / "emu" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    lib = build.build()
    torch.ops.load_library(str(lib))
    return lib


@pytest.fixture(scope="session")
def emu_lib():
    return library()


def emulated(name: str) -> bool:
    """True when the emulation library has the CUDA kernel of llada::<name>."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"llada_emu::{name}", "CPU")


def set_schedule(order="forward", seed=0, preempt=0.0, hazards=True):
    library()
    torch.ops.llada_emu._set_schedule(order, seed, preempt, hazards)


def plant(what="none", file="", line=0):
    """Plant a bug at run time (see llada_emu::_plant); plant() removes it."""
    library()
    torch.ops.llada_emu._plant(what, file, line)


STATS = ("launches", "blocks", "threads", "barriers", "warp_ops", "mmas", "shared_accesses", "preemptions")


def stats() -> dict[str, int]:
    library()
    return dict(zip(STATS, torch.ops.llada_emu._stats()))


def symbolize(message: str) -> str:
    """`{pc:0x...}` (a return address in the emulation library) -> the `file:line (function)` of
    the call before it; `{fn:0x...}` (a function) -> its name."""
    tags = re.findall(r"\{(pc|fn):(0x[0-9a-f]+)\}", message)
    if not tags:
        return message
    addrs = [hex(int(a, 16) - 1) if kind == "pc" else a for kind, a in tags]
    try:
        out = subprocess.run(["addr2line", "-e", str(library()), "-f", "-C"] + addrs,
                             capture_output=True, text=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return message
    for (kind, addr), func, loc in zip(tags, out[::2], out[1::2]):
        loc = re.sub(r"\s*\(discriminator \d+\)", "", loc)
        loc = loc[loc.find("csrc/"):] if "csrc/" in loc else loc
        func = func.replace("(anonymous namespace)::", "").split("(")[0].strip()
        func = func if func and func != "??" else ""
        text = func if kind == "fn" else f"{loc} ({func.rsplit('::', 1)[-1]})" if func else loc
        message = message.replace(f"{{{kind}:{addr}}}", text, 1)
    return message


def _bits(t):
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_floating_point() or t.is_complex():
        return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
    return a == b


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(y) for y in x)
    return x


_calls = 0


def run(name, args, kwargs=None, schedules=(FIRST, SECOND), hazards=True):
    """llada_emu::<name>(*args) under each schedule, the earlier runs on clones of the inputs;
    every run must give the same bits. Returns the last run's result."""
    global _calls
    kwargs = kwargs or {}
    op = getattr(torch.ops.llada_emu, name)
    results = []
    for i, (order, preempt) in enumerate(schedules):
        last = i == len(schedules) - 1
        a, kw = (args, kwargs) if last else (_clone(args), _clone(kwargs))
        _calls += 1
        set_schedule(order, seed=_calls, preempt=preempt, hazards=hazards)
        try:
            out = op(*a, **kw)
        except RuntimeError as e:
            raise RuntimeError(symbolize(str(e))) from None
        finally:
            set_schedule()
        results.append((out, a, kw))
    first = results[0]
    for (out, a, kw), (order, _) in zip(results[1:], schedules[1:]):
        if not _same(out, first[0]):
            raise AssertionError(f"llada_emu::{name}: the {schedules[0][0]} and {order} thread orders "
                                 "give different results")
        if not (_same(list(a), list(first[1])) and _same(kw, first[2])):
            raise AssertionError(f"llada_emu::{name}: the {schedules[0][0]} and {order} thread orders "
                                 "leave different values in the inputs written in place")
    return results[-1][0]


class EmulatedCuda(TorchDispatchMode):
    """Routes llada::<op> calls with an emulated CUDA kernel to it (see the module docstring).
    `calls` counts them by op name."""

    def __init__(self, schedules=(FIRST, SECOND), hazards=True):
        super().__init__()
        library()
        self.schedules, self.hazards = schedules, hazards
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "llada":
            return func(*args, **kwargs)
        name = func._schema.name.split("::", 1)[1]
        if emulated(name):
            self.calls[name] += 1
            return run(name, args, kwargs, self.schedules, self.hazards)
        with self:  # a composite: run its CPU kernel with the llada ops it calls routed too
            return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
