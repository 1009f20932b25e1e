"""Why CPU attention in fp32 cannot reach 3x eager math on a machine like ours: eager math is
two GEMMs (Q K^T and P V) run by the BLAS at close to the FMA peak, plus a memory-bound
softmax. A fused kernel saves the softmax traffic but still has to do both GEMMs, so its
speedup is bounded by (eager time) / (time of the two GEMMs at the BLAS's rate).

    python benchmarks/roofline_cpu_attention.py [--L 512 1024 4096] [--threads N]

Prints, per L, the time of eager's parts (QK^T GEMM, masked softmax, PV GEMM), the GEMMs'
GFLOP/s, our forward's time and GFLOP/s, and two bounds on any fused kernel's speedup: eager
over its GEMMs alone, and eager over the attention FLOPs at the rate of a large square GEMM.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import llada_kernels as lk


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, nargs="+", default=[512, 1024, 4096])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, D = args.B, args.H, args.D
    a = torch.randn(1536, 1536)
    peak = 2 * 1536 ** 3 / median_ms(lambda: a @ a, 5) / 1e6  # GFLOP/s of a large square GEMM
    print(f"threads={torch.get_num_threads()} B={B} H={H} D={D} fp32; "
          f"large GEMM: {peak:.0f} GFLOP/s")
    print("L | eager ms (QK^T / softmax / PV) | GEMM GFLOP/s | ours ms, GFLOP/s | eager/ours | "
          "bound: eager / GEMMs at eager's rate, at the large-GEMM rate")
    for L in args.L:
        reps = 3 if L >= 4096 else 10
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[:, : L // 10] = False
        bias = torch.zeros(B, 1, 1, L).masked_fill(~mask[:, None, None, :], -math.inf)
        kt = k.transpose(-1, -2)
        s = q @ kt
        p = torch.softmax(s, -1)
        t_qk = median_ms(lambda: q @ kt, reps)
        t_sm = median_ms(lambda: torch.softmax(s * D ** -0.5 + bias, -1), reps)
        t_pv = median_ms(lambda: p @ v, reps)
        t_eager = median_ms(lambda: lk.attention(q, k, v, key_padding_mask=mask, backend="reference"), reps)
        t_ours = median_ms(lambda: lk.attention(q, k, v, key_padding_mask=mask, backend="cpu"), reps)
        gemm_flops = 2 * B * H * L * L * D
        print(f"{L} | {t_eager:.1f} ({t_qk:.1f} / {t_sm:.1f} / {t_pv:.1f}) | "
              f"{gemm_flops / t_qk / 1e6:.0f} / {gemm_flops / t_pv / 1e6:.0f} | "
              f"{t_ours:.1f}, {2 * gemm_flops / t_ours / 1e6:.0f} | {t_eager / t_ours:.2f}x | "
              f"{t_eager / (t_qk + t_pv):.2f}x, {t_eager / (2 * gemm_flops / peak / 1e6):.2f}x")


if __name__ == "__main__":
    main()
