"""What every benchmark shares: devices, timing through pytest-benchmark, peak memory, and the
extra fields that benchmarks/run.py turns into CSV columns (every row names its machine and the
instruction sets its code ran with: machine() and isa()).

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


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_features(flags: set[str]) -> str:
    """The vector instruction sets a CPU has that matter here, best first."""
    names = [("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"),
             ("avx2", "AVX2"), ("sse4_2", "SSE4.2")]
    have = [name for flag, name in names if flag in flags]
    return "+".join(have[:2]) if have else platform.machine()


def machine(device) -> str:
    """The machine a row was measured on: for CPU rows the model name, family and model (VMs
    often hide the name: "AMD EPYC" is both a Zen 1 and a Zen 5), the vector instruction sets and
    the core count, e.g. "AMD EPYC (family 26 model 2), AVX512-BF16+AVX512, 2 cores"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        model += f" (family {info['cpu family']} model {info['model']})"
    return f"{model}, {cpu_features(set(info.get('flags', '').split()))}, {os.cpu_count()} cores"


def isa(device) -> str:
    """The instruction sets the row's code ran with: llada's CPU kernels and ATen's (SDPA, eager
    math), e.g. "llada AVX512, ATen AVX512". Empty for CUDA rows."""
    if device.type != "cpu":
        return ""
    import llada_kernels

    return (f"llada {llada_kernels.cpu_capability() or 'none'}, "
            f"ATen {torch.backends.cpu.get_cpu_capability()}")


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
        machine=machine(device), isa=isa(device))
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=iterations_for(elapsed))
