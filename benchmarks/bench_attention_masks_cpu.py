"""The CPU kernel of llada::attention_fwd/bwd with structured masks, against SDPA given the
equivalent dense boolean mask and against our own op with the mask dropped (full attention).

    python benchmarks/run.py -k attention_masks

Masks (B=1, H=4, D=64, built by llada_kernels.masks; the op is llada_kernels.attention with
backend="cpu"): block-causal with b = 32 over L tokens, and the 2L block-diffusion
training mask with b = 32 over [x_t ; x_0], 2L tokens, at L = 1024 and 4096; forward, and forward
+ backward. Providers in one row group: "ours" (the structured mask), "ours_full" (masks None:
every tile computed), "sdpa" (F.scaled_dot_product_attention with the dense [2L, 2L] bool mask,
built outside the timing). The note column says how many (query tile, key tile) pairs the mask
skips, and how many need the per-element mask, at the kernel's 64 x 64 tiles.

Targets (issue 10, CPU): ours at least 2x SDPA-with-dense-mask, and, for the 2L mask, at least
1.5x ours_full; peak extra memory O(L).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import llada_kernels as lk

from _common import isa, iterations_for, machine, peak_extra_bytes

B, H, D, BLOCK = 1, 4, 64, 32
TILE = 64  # the kernel's query and key tiles (csrc/cpu/attention_{fwd,bwd}.cpp)

# name -> (builder of the AttentionMask over L, attention tokens per L)
MASKS = {"block_causal_b32": (lambda L: lk.masks.block_causal(BLOCK, seq_len=L), 1),
         "two_l_b32": (lambda L: lk.masks.block_diffusion(BLOCK, L), 2)}


CASES = [(mask, L, dtype, mode)
         for mask in MASKS for L in (1024, 4096) for mode in ("fwd", "fwd_bwd")
         for dtype in ((torch.float32, torch.bfloat16) if L == 1024 else (torch.float32,))]
PROVIDERS = ["ours", "ours_full", "sdpa"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mask,L,dtype,mode", CASES,
                         ids=[f"{m}-L{L}-{str(t).removeprefix('torch.')}-{mode}" for m, L, t, mode in CASES])
def test_attention_masks_cpu(benchmark, mask, L, dtype, mode, provider):
    build, per_l = MASKS[mask]
    attn_mask = build(L)
    T = per_l * L
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).to(dtype).requires_grad_(mode == "fwd_bwd")
               for _ in range(3))
    grad = torch.randn(B, H, T, D, generator=gen).to(dtype)
    scale = D ** -0.5
    if provider == "sdpa":
        dense = attn_mask.to_dense()[:, None]  # [B, 1, T, T]: built outside the timing
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)  # noqa: E731
    else:  # the public op on the C++ CPU kernel; ours_full drops the mask (every tile computed)
        m = attn_mask if provider == "ours" else None
        fn = lambda: lk.attention(q, k, v, m, scale=scale, backend="cpu")  # noqa: E731

    def step():
        out = fn()
        if mode == "fwd_bwd":
            torch.autograd.grad(out, (q, k, v), grad)

    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    peak = peak_extra_bytes(step, torch.device("cpu"))
    tiles = attn_mask.tile_counts(TILE, TILE)
    benchmark.group = f"attention_masks {mask} L={L} {dtype} {mode}"
    benchmark.pedantic(step, rounds=3 if T >= 4096 else 5, iterations=iterations_for(elapsed),
                       warmup_rounds=1)
    flops = 4 * B * H * T * T * D * (3.5 if mode == "fwd_bwd" else 1.0)
    benchmark.extra_info.update(
        op=f"attention_masks[{mask}, {mode}]", provider=provider, device="cpu",
        dtype=str(dtype).removeprefix("torch."), shape=f"B={B} H={H} L={L} ({T} tokens) D={D}",
        flops=flops, peak_extra_bytes=peak, machine=machine(torch.device("cpu")),
        isa=isa(torch.device("cpu")),
        note=(f"{tiles['skip']}/{tiles['total']} tiles skipped "
              f"({tiles['skip'] / tiles['total']:.0%}), {tiles['partial']} partial"
              if provider == "ours" else ""))
