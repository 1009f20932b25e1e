"""Benchmarks: the masked diffusion loss against LLaDA's eager loss (GUIDELINES.md), forward +
backward, on CPU now and on CUDA when present.

    pytest benchmarks/bench_masked_diffusion_loss.py --benchmark-only      # time (pytest-benchmark)
    python benchmarks/bench_masked_diffusion_loss.py                       # ratios and peak memory

Two comparisons, inputs noised as in pre-training (t ~ U(0, 1) per sequence):
  * logits form: llada_pretrain_loss(logits, ...) against guidelines_pretrain_loss (gather the
    masked rows, F.cross_entropy, / p_mask). Target on CPU: >= 2x.
  * fused form: llada_pretrain_loss(hidden, ..., lm_head_weight=W) against
    guidelines_pretrain_loss(hidden @ W.T, ...). Targets on CPU: >= 1.5x the speed and <= 25% of
    eager's peak memory.
The baselines come from llada_kernels.reference.loss, so they never drift from the tests. On CUDA
the fused form also runs Liger's and Cut Cross-Entropy's fused linear cross-entropy where they
import (benchmarks/_peers.py), on the same masked rows with the same 1 / p_mask weights.

Everything a runner needs is importable: CASES, providers(), make_inputs(), step(),
peak_memory(). Peak memory is the extra memory one forward + backward takes over its inputs:
torch.cuda.max_memory_allocated on CUDA; on CPU the growth of the process's peak RSS (VmHWM,
reset through /proc/self/clear_refs) in a fresh subprocess where glibc maps every large
allocation on its own (MALLOC_MMAP_THRESHOLD_), so no allocator cache hides one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llada_kernels
from llada_kernels import training
from llada_kernels.reference.loss import guidelines_pretrain_loss

import _peers
from _common import isa, machine

# name -> (form, shape); logits shapes are (B, L, V), fused shapes (B, L, D, V).
CASES = {
    "cpu": {
        "logits-B2xL256xV32000": ("logits", (2, 256, 32000)),
        "logits-B1xL64xV126464": ("logits", (1, 64, 126464)),
        "fused-B2xL512xD256xV32000": ("fused", (2, 512, 256, 32000)),
        "fused-B2xL1024xD512xV32000": ("fused", (2, 1024, 512, 32000)),
        "fused-B1xL512xD64xV126464": ("fused", (1, 512, 64, 126464)),
        "fused-B1xL512xD256xV126464": ("fused", (1, 512, 256, 126464)),
    },
    "cuda": {
        "logits-B4xL4096xV126464-bf16": ("logits", (4, 4096, 126464)),
        "fused-B4xL4096xD4096xV126464-bf16": ("fused", (4, 4096, 4096, 126464)),
    },
}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def providers(device: str) -> list[str]:
    """eager first, then every llada_kernels backend that runs on `device`."""
    kernels = [b for b in llada_kernels.available_backends("masked_diffusion_loss", device) if b != "reference"]
    return ["eager"] + kernels


def make_inputs(case: str, device: str, seed: int = 0):
    """(x, weight or None, input_ids, masked, p_mask); x is logits or hidden, requiring grad."""
    form, shape = CASES[device][case]
    dtype = DTYPE[device]
    g = torch.Generator(device).manual_seed(seed)
    B, L, V = shape[0], shape[1], shape[-1]
    ids = torch.randint(0, V, (B, L), device=device, generator=g)
    _, masked, p_mask = training.forward_process(ids, generator=g)
    if form == "logits":
        x = torch.randn(B, L, V, device=device, generator=g).mul_(3).to(dtype).requires_grad_()
        return x, None, ids, masked, p_mask
    D = shape[2]
    x = torch.randn(B, L, D, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=device, generator=g) / D ** 0.5).to(dtype).requires_grad_()
    return x, w, ids, masked, p_mask


def step(provider: str, inputs) -> None:
    """One forward + backward; gradients are dropped so each call does the same work."""
    x, w, ids, masked, p_mask = inputs
    if provider == "eager":
        logits = x if w is None else F.linear(x, w)
        loss = guidelines_pretrain_loss(logits, ids, masked, p_mask)
    elif provider in _peers.FUSED_LOSS:
        loss = _peers.fused_loss_step(provider, x, w, ids, masked, p_mask)
    else:
        loss = training.llada_pretrain_loss(x, ids, masked, p_mask, lm_head_weight=w, backend=provider)
    loss.backward()
    x.grad = None
    if w is not None:
        w.grad = None


def peak_memory(provider: str, case: str, device: str) -> int:
    """Extra bytes at the peak of one forward + backward, over the inputs."""
    if device == "cuda":
        inputs = make_inputs(case, device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(provider, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # glibc serves every allocation of 64 KiB or more with its own mmap and unmaps it on free,
    # so the RSS follows the live tensors and no freed-but-kept heap hides an allocation.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a source checkout too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, "--peak-rss", provider, case], check=True,
                         capture_output=True, text=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _peak_rss_child(provider: str, case: str) -> int:
    torch.set_num_threads(1)
    step(provider, make_inputs(case, "cpu", seed=1))  # warm-up: lazy inits, library loads
    inputs = make_inputs(case, "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    step(provider, inputs)
    return (_rss_kib("VmHWM") - base) * 1024


# --- pytest-benchmark ---------------------------------------------------------------------------

def _params():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    def peers(d, c):  # Liger's and Cut Cross-Entropy's fused linear CE, where they import
        return _peers.fused_loss_peers() if d == "cuda" and CASES[d][c][0] == "fused" else []

    return [pytest.param(d, c, p, id=f"{d}-{c}-{p}")
            for d in devices for c in CASES[d] for p in providers(d) + peers(d, c)]


@pytest.mark.parametrize("device, case, provider", _params())
def test_masked_diffusion_loss(benchmark, device, case, provider):
    inputs = make_inputs(case, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        step(provider, inputs)
        sync()

    benchmark.group = f"{device}-{case}"
    benchmark.extra_info.update(op=f"masked_diffusion_loss[{CASES[device][case][0]}]", provider=provider,
                                shape=case, device=device, dtype=str(DTYPE[device]).removeprefix("torch."),
                                machine=machine(torch.device(device)), isa=isa(torch.device(device)))
    benchmark.pedantic(run, warmup_rounds=1, rounds=5 if device == "cpu" else 20)
    if CASES[device][case][0] == "fused":
        benchmark.extra_info["peak_extra_bytes"] = peak_memory(provider, case, device)


# --- a quick table without pytest ---------------------------------------------------------------

def _table(device: str = "cpu", rounds: int = 5) -> list[dict]:
    import time

    rows = []
    for case, (form, _) in CASES[device].items():
        inputs = make_inputs(case, device)
        result = {}
        for provider in providers(device):
            step(provider, inputs)  # warm-up
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                step(provider, inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            times.sort()
            entry = {"case": case, "provider": provider, "median_s": times[len(times) // 2]}
            if form == "fused":
                entry["peak_extra_MiB"] = peak_memory(provider, case, device) / 2**20
            result[provider] = entry
        for provider, entry in result.items():
            entry["speedup_vs_eager"] = result["eager"]["median_s"] / entry["median_s"]
            if "peak_extra_MiB" in entry:
                entry["memory_vs_eager"] = entry["peak_extra_MiB"] / max(result["eager"]["peak_extra_MiB"], 1e-9)
            rows.append(entry)
            print(json.dumps(entry), flush=True)
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak-rss":
        print(_peak_rss_child(sys.argv[2], sys.argv[3]))
    else:
        _table(sys.argv[1] if len(sys.argv) > 1 else "cpu")
