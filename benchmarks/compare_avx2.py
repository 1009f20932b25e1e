"""The AVX2 path against the kernels it replaced, on one machine: every CPU op of two source
trees timed in alternating child processes, each restricted to AVX2 throughout (our kernels:
LLADA_CPU_CAPABILITY=AVX2; oneDNN: ONEDNN_MAX_CPU_ISA=AVX2; MKL: MKL_ENABLE_INSTRUCTIONS=AVX2;
ATen: ATEN_CPU_CAPABILITY=avx2), so an AVX-512 machine stands in for an AVX2 one.

    python benchmarks/compare_avx2.py OLD_TREE NEW_TREE [--threads N] [--rounds R]

Each tree must hold a built llada_kernels (its _C library next to the package). Prints, per
case, the median time of each tree over the rounds (the trees alternate, so a neighbour's load
hits both alike) and new / old. The CPU time of the child (process_time) is what is timed: on
a shared machine it is less disturbed by other processes than the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

AVX2_ENV = {"LLADA_CPU_CAPABILITY": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

CHILD = r'''
import json, sys, time, torch
import llada_kernels as lk
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
def timed(fn, n=3):
    fn()
    best = float("inf")
    for _ in range(n):
        t = time.process_time(); fn(); best = min(best, time.process_time() - t)
    return best
out = {}
for dtype in (torch.float32, torch.bfloat16):
    for L in (1024, 4096):
        q, k, v = (torch.randn(1, 4, L, 64).to(dtype).requires_grad_() for _ in range(3))
        g = torch.randn_like(q)
        name = f"attention {str(dtype)[6:]} L={L}"
        out[name + " fwd"] = timed(lambda: lk.bidirectional_attention(q, k, v, backend="cpu"))
        out[name + " fwd+bwd"] = timed(lambda: torch.autograd.grad(
            lk.bidirectional_attention(q, k, v, backend="cpu"), (q, k, v), g))
logits = torch.randn(2, 256, 126464).bfloat16()
x = torch.full((2, 256), 126336)
out["remask_step all masked B=2 L=256 bf16"] = timed(lambda: lk.remask_step(logits, x, 32, backend="cpu"))
lg = torch.randn(2, 256, 32000).mul(3).requires_grad_()
ids = torch.randint(0, 32000, (2, 256)); masked = torch.rand(2, 256) < 0.5; p = torch.rand(2) * 0.9 + 0.1
out["masked_diffusion_loss logits B=2 L=256 V=32000"] = timed(
    lambda: lk.masked_diffusion_loss(lg, ids, masked, p, backend="cpu").backward())
h = torch.randn(2, 512, 256).requires_grad_(); w = (torch.randn(32000, 256) / 16).requires_grad_()
ids2 = torch.randint(0, 32000, (2, 512)); m2 = torch.rand(2, 512) < 0.5
out["fused loss B=2 L=512 D=256 V=32000"] = timed(
    lambda: lk.fused_linear_masked_diffusion_loss(h, w, ids2, m2, p, backend="cpu").backward())
print(json.dumps(out))
'''


def run(tree, threads):
    env = {**os.environ, **AVX2_ENV, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, "-c", CHILD, str(threads)], capture_output=True, text=True,
                       env=env, cwd=tree, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    times = {"old": [], "new": []}
    for _ in range(a.rounds):
        for which, tree in (("old", a.old), ("new", a.new)):
            times[which].append(run(tree, a.threads))
    print(f"{'case':48s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s}")
    for case in times["old"][0]:
        old = statistics.median(r[case] for r in times["old"]) * 1e3
        new = statistics.median(r[case] for r in times["new"]) * 1e3
        print(f"{case:48s} {old:9.1f} {new:9.1f} {new / old:8.2f}")


if __name__ == "__main__":
    main()
