"""What every benchmark shares: devices, timing through pytest-benchmark, peak memory, and the
extra fields that benchmarks/run.py turns into CSV columns.

A benchmark calls `measure(benchmark, fn, provider=..., ...)`. Timing is pytest-benchmark's;
peak extra memory is measured in one separate call of fn:
  * CUDA: torch.cuda.max_memory_allocated above what was allocated before the call;
  * CPU: the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs)
    above the resident size before the call. It counts every allocation, torch's or not.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest
import torch


def devices():
    out = [pytest.param(torch.device("cpu"), id="cpu")]
    if torch.cuda.is_available():
        out.append(pytest.param(torch.device("cuda"), id="cuda"))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn, device) -> int | None:
    """Peak memory of one call of fn above what was in use before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        before = _status_kb("VmRSS")
        fn()
        return max(0, _status_kb("VmHWM") - before) * 1024
    except OSError:  # not Linux
        return None


def machine(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def iterations_for(seconds: float, round_s: float = 0.05) -> int:
    """Calls per timed round, so that a round lasts about round_s: a single call of a few
    milliseconds is at the mercy of thread wake-ups on a 2-core machine."""
    return max(1, min(100, round(round_s / max(seconds, 1e-6))))


def measure(benchmark, fn, *, op, provider, shape, dtype, device, bytes=None, flops=None,
            rounds=5, warmup=1):
    """Time fn with pytest-benchmark and record the columns benchmarks/run.py writes."""
    start = time.perf_counter()
    fn()  # compile / warm caches outside the timing
    sync(device)
    elapsed = time.perf_counter() - start
    if elapsed > 2.0:  # slow eager baselines on 2 cores: fewer rounds
        rounds, warmup = min(rounds, 3), 0
    peak = peak_extra_bytes(fn, device)

    def timed():
        fn()
        sync(device)

    benchmark.group = f"{op} {shape} {str(dtype).removeprefix('torch.')} {device.type}"
    benchmark.extra_info.update(
        op=op, provider=provider, shape=shape, dtype=str(dtype).removeprefix("torch."),
        device=device.type, bytes=bytes, flops=flops, peak_extra_bytes=peak,
        machine=machine(device))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=iterations_for(elapsed))
