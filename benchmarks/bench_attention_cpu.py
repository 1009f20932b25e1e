"""The CPU attention kernel against SDPA at the shapes of issue 15, forward and forward+backward.

    python benchmarks/run.py -k attention_cpu

B=1 H=4 and B=2 H=8, L = 1024 and 4096, D = 64 and 128, unpadded and padded (the first 10% of
every row's keys), fp32 and bf16. Providers in one row group: "ours"
(llada_kernels.attention with key_padding_mask, on the cpu backend) and "sdpa"
(F.scaled_dot_product_attention with the same boolean mask: PyTorch's CPU flash kernel).
Target: ours at least 1.0x SDPA everywhere. Eager math is left out here (minutes per call at
these sizes); benchmarks/bench_bidirectional_attention.py compares it at B=1 H=4 D=64.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import llada_kernels as lk

from _common import isa, iterations_for, machine

SHAPES = [(1, 4), (2, 8)]
CASES = [(B, H, L, D, padded, dtype, mode)
         for B, H in SHAPES for L in (1024, 4096) for D in (64, 128) for padded in (False, True)
         for dtype in (torch.float32, torch.bfloat16) for mode in ("fwd", "fwd_bwd")]


def _id(case):
    B, H, L, D, padded, dtype, mode = case
    return f"B{B}-H{H}-L{L}-D{D}-{'padded' if padded else 'full'}-{str(dtype)[6:]}-{mode}"


@pytest.mark.parametrize("provider", ["ours", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_attention_cpu(benchmark, case, provider):
    B, H, L, D, padded, dtype, mode = case
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(dtype).requires_grad_(mode == "fwd_bwd")
               for _ in range(3))
    grad = torch.randn(B, H, L, D, generator=gen).to(dtype)
    mask = None
    if padded:
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[:, : L // 10] = False
    if provider == "ours":
        fn = lambda: lk.attention(q, k, v, key_padding_mask=mask, backend="cpu")  # noqa: E731
    else:
        attn = None if mask is None else mask[:, None, None, :]
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn)  # noqa: E731

    def step():
        out = fn()
        if mode == "fwd_bwd":
            torch.autograd.grad(out, (q, k, v), grad)

    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    benchmark.group = f"attention_cpu {_id(case)}"
    benchmark.pedantic(step, rounds=2 if elapsed > 1.0 else 5, iterations=iterations_for(elapsed),
                       warmup_rounds=1)
    flops = 4 * B * H * L * L * D * (3.5 if mode == "fwd_bwd" else 1.0)
    benchmark.extra_info.update(
        op=f"attention_cpu[{mode}{', padded' if padded else ''}]", provider=provider, device="cpu",
        dtype=str(dtype).removeprefix("torch."), shape=f"B={B} H={H} L={L} D={D}", flops=flops,
        machine=machine(torch.device("cpu")), isa=isa(torch.device("cpu")))
