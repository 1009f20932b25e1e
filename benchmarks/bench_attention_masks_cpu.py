"""The CPU kernel of llada::attention_fwd/bwd with structured masks, against SDPA given the
equivalent dense boolean mask and against our own op with the mask dropped (full attention).

    python benchmarks/run.py -k attention_masks

Masks (B=1, H=4, D=64): block-causal with b = 32 over L tokens, and the 2L block-diffusion
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

import llada_kernels  # noqa: F401  (registers the ops)

from _common import isa, iterations_for, machine, peak_extra_bytes

INF = 2**31 - 1
B, H, D, BLOCK = 1, 4, 64, 32
TILE = 64  # the kernel's query and key tiles (csrc/cpu/attention_{fwd,bwd}.cpp)


def block_causal(L, b=BLOCK):
    pos = torch.arange(L)
    zeros = torch.zeros(B, L, dtype=torch.int32)
    q = torch.stack([zeros, (pos // b).expand(B, L).int()], 1)
    k = torch.stack([zeros, (pos // b).expand(B, L).int(), torch.full((B, L), INF, dtype=torch.int32)], 1)
    return q.contiguous(), k.contiguous()


def two_l(L, b=BLOCK):
    n = torch.arange(L) // b
    level = torch.cat([2 * n, 2 * n + 1]).expand(B, 2 * L).int()
    hi = torch.cat([2 * n, torch.full((L,), INF)]).expand(B, 2 * L).int()
    zeros = torch.zeros(B, 2 * L, dtype=torch.int32)
    return torch.stack([zeros, level], 1).contiguous(), torch.stack([zeros, level, hi], 1).contiguous()


MASKS = {"block_causal_b32": (block_causal, 1), "two_l_b32": (two_l, 2)}  # builder, tokens per L


def dense(q_mask, k_mask):
    qd, lv = q_mask[:, 0, :, None], q_mask[:, 1, :, None]
    kd, lo, hi = (k_mask[:, i, None, :] for i in range(3))
    return (qd == kd) & (lo <= lv) & (lv <= hi)


def tile_counts(q_mask, k_mask, tile=TILE):
    """(skipped, partial, total) tile pairs under the kernels' rule (csrc/cpu/attention.h,
    classify): from each tile's min and max, the tile past Lk never full."""
    big = 2**62

    def stats(x):  # per tile: the min and the max over the rows < L
        pad = (-x.shape[-1]) % tile
        lo = F.pad(x.long(), (0, pad), value=big).view(*x.shape[:-1], -1, tile).amin(-1)
        hi = F.pad(x.long(), (0, pad), value=-big).view(*x.shape[:-1], -1, tile).amax(-1)
        return lo, hi

    (qd0, qd1), (ql0, ql1) = (tuple(t[:, :, None] for t in stats(q_mask[:, i])) for i in range(2))
    (kd0, kd1), (klo0, klo1), (khi0, khi1) = (tuple(t[:, None, :] for t in stats(k_mask[:, i]))
                                              for i in range(3))
    skip = (qd1 < kd0) | (kd1 < qd0) | (ql1 < klo0) | (ql0 > khi1)
    full = ~skip & (qd0 == qd1) & (kd0 == kd1) & (qd0 == kd0) & (klo1 <= ql0) & (ql1 <= khi0)
    if k_mask.shape[-1] % tile:
        full[..., -1] = False
    return int(skip.sum()), int((~skip & ~full).sum()), skip.numel()


CASES = [(mask, L, dtype, mode)
         for mask in MASKS for L in (1024, 4096) for mode in ("fwd", "fwd_bwd")
         for dtype in ((torch.float32, torch.bfloat16) if L == 1024 else (torch.float32,))]
PROVIDERS = ["ours", "ours_full", "sdpa"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mask,L,dtype,mode", CASES,
                         ids=[f"{m}-L{L}-{str(t).removeprefix('torch.')}-{mode}" for m, L, t, mode in CASES])
def test_attention_masks_cpu(benchmark, mask, L, dtype, mode, provider):
    build, per_l = MASKS[mask]
    q_mask, k_mask = build(L)
    T = per_l * L
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).to(dtype).requires_grad_(mode == "fwd_bwd")
               for _ in range(3))
    grad = torch.randn(B, H, T, D, generator=gen).to(dtype)
    scale = D ** -0.5
    if provider == "sdpa":
        attn_mask = dense(q_mask, k_mask)[:, None]  # [B, 1, T, T]: built outside the timing
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)  # noqa: E731
    else:
        qm, km = (q_mask, k_mask) if provider == "ours" else (None, None)
        fn = lambda: torch.ops.llada.attention_fwd(q, k, v, qm, km, scale)[0]  # noqa: E731

    def step():
        out = fn()
        if mode == "fwd_bwd":
            torch.autograd.grad(out, (q, k, v), grad)

    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    peak = peak_extra_bytes(step, torch.device("cpu"))
    skipped, partial, total = tile_counts(q_mask, k_mask)
    benchmark.group = f"attention_masks {mask} L={L} {dtype} {mode}"
    benchmark.pedantic(step, rounds=3 if T >= 4096 else 5, iterations=iterations_for(elapsed),
                       warmup_rounds=1)
    flops = 4 * B * H * T * T * D * (3.5 if mode == "fwd_bwd" else 1.0)
    benchmark.extra_info.update(
        op=f"attention_masks[{mask}, {mode}]", provider=provider, device="cpu",
        dtype=str(dtype).removeprefix("torch."), shape=f"B={B} H={H} L={L} ({T} tokens) D={D}",
        flops=flops, peak_extra_bytes=peak, machine=machine(torch.device("cpu")),
        isa=isa(torch.device("cpu")),
        note=(f"{skipped}/{total} tiles skipped ({skipped / total:.0%}), {partial} partial"
              if provider == "ours" else ""))
