"""The noise contract shared by the C++ CPU, Triton and CUDA kernels (csrc/common/random.h):
Philox draws recomputed independently in numpy, Gumbel noise that keeps float64's tail, exact
Gumbel-max at T > 0, and fp32 confidences within 2e-6 of float64."""

import math

import pytest
import torch

import llada_kernels
from conftest import KERNEL_BACKENDS
from test_remask_step import MASK, MODES, make_inputs

OPS = {"cpu": "remask_step", "triton": "remask_step_triton"}


def test_gumbel_from_bits_extremes():
    ones = -1  # all 64 bits set
    patterns = [0, 1, (1 << 11) - 1, 1 << 11, 1 << 12, (1 << 63) - 1, 1 << 63, (1 << 63) + (1 << 11),
                (1 << 64) - (1 << 11), (1 << 64) - (2 << 11), ones, 0x5555555555555555,
                0x8000000000000000 - (1 << 11), 0xDEADBEEFCAFEBABE]
    as_int64 = [p - (1 << 64) if p >= 1 << 63 else p for p in patterns]
    g = torch.ops.llada.gumbel_from_bits(torch.tensor(as_int64, dtype=torch.int64))
    assert g.dtype == torch.float32
    for p, got in zip(patterns, g.tolist()):
        n = (p % (1 << 64)) >> 11
        u = (n + 0.5) * 2.0 ** -53
        # float64 -log(-log u), with the complement for u near 1 (as the contract computes it)
        e = -math.log1p(-(((1 << 53) - 1 - n) + 0.5) * 2.0 ** -53) if u >= 0.5 else -math.log(u)
        want = -math.log(e)
        assert math.isfinite(got) and abs(got - want) <= 4e-7 * max(1.0, abs(want)), (hex(p), got, want)
    assert g.max().item() < 38.0  # the bound the kernel's pruning relies on
    # The tail: LLaDA's float64 torch.rand reaches g = 36.7; 32-bit uniforms would stop near 16.6.
    assert g.max().item() > 37.0
    # a wide sample: every value finite, mean Euler-Mascheroni, variance pi^2 / 6
    bits = torch.randint(-(2**63), 2**63 - 1, (200_000,), generator=torch.Generator().manual_seed(0))
    s = torch.ops.llada.gumbel_from_bits(bits).double()
    assert torch.isfinite(s).all()
    assert abs(s.mean().item() - 0.5772156649) < 0.01
    assert abs(s.var().item() - math.pi**2 / 6) < 0.03


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_sampling_is_exact(backend, dtype):
    """x0 at T > 0 is exactly the argmax of fp32 fma(T, g, l) over the contract's noise
    (common/random.h), drawn here independently in numpy. The CPU kernel skips ids whose noisy
    logit is bounded below the best, so this also proves that pruning exact."""
    B, L, V = 1, 32, 3001 if backend == "cpu" else 301
    logits, _ = make_inputs(B, L, V, dtype=dtype)
    logits = logits.float()
    x = torch.full((B, L), MASK)
    seed = torch.tensor([1234])
    for T in (0.05, 0.5, 1.0, 3.0, 30.0):
        x0 = getattr(torch.ops.llada, OPS[backend])(logits, None, 0.0, x, torch.tensor([L]), torch.tensor([L]),
                                         MASK, T, "low_confidence", None, [], [], seed)[0]
        bits = _philox_bits(seed.item(), B * L, V)  # [B*L, V] uint64 as int64
        g = torch.ops.llada.gumbel_from_bits(bits.flatten()).view(B * L, V)
        # fp32 fma(T, g, l) is l + T g (exact in float64) rounded once to fp32
        noisy = (logits.reshape(B * L, V).double() + T * g.double()).float()
        assert torch.equal(x0.flatten(), noisy.argmax(-1))


def _philox_bits(seed, R, V):
    """Gumbel draws of common/random.h for positions [0, R) and ids [0, V), in numpy."""
    import numpy as np
    M0, M1, W0, W1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), 0x9E3779B9, 0xBB67AE85
    j = np.arange((V + 1) // 2, dtype=np.uint64)
    r = np.arange(R, dtype=np.uint64)
    c0 = np.broadcast_to(j[None, :], (R, j.size)).copy()
    c1 = np.broadcast_to((r & np.uint64(0xFFFFFFFF))[:, None], c0.shape).copy()
    c2 = np.broadcast_to((r >> np.uint64(32))[:, None], c0.shape).copy()
    c3 = np.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    mask = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p2 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = ((p2 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p2 & mask,
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & mask)
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    even = (c0 << np.uint64(32)) | c1
    odd = (c2 << np.uint64(32)) | c3
    out = np.stack([even, odd], -1).reshape(R, -1)[:, :V]
    return torch.from_numpy(out.view(np.int64).copy())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("remasking", MODES)
def test_confidence_accuracy(backend, remasking):
    """Each confidence is within 2e-6 of its float64 value (relative to max(|c|, p1)): a
    threshold just below it commits the position, one just above does not."""
    B, L, V = 1, 8, 4099
    logits = torch.randn(B, L, V, generator=torch.Generator().manual_seed(3)) * 3
    p = torch.softmax(logits.double(), -1)
    top = p.topk(2, -1).values
    c = {"low_confidence": top[..., 0], "margin": top[..., 0] - top[..., 1],
         "entropy": (p * p.log()).sum(-1)}[remasking]
    tol = 2e-6 * torch.maximum(c.abs(), top[..., 0])
    x = torch.full((B, L), MASK)
    for l in range(L):
        for t, expect in ((c[0, l] - tol[0, l], True), (c[0, l] + tol[0, l], False)):
            transfer = llada_kernels.remask_step(logits, x, 0, mask_id=MASK, remasking=remasking,
                                                 threshold=t.item(), backend=backend)[1]
            assert transfer[0, l].item() == expect, (l, c[0, l].item(), t.item())



def test_cpu_and_triton_draw_the_same_noise():
    """One contract: the same seed samples the same tokens and the same random order."""
    logits, x = make_inputs(2, 6, 300, masked=1.0, seed=4)
    outs = []
    for backend in ("cpu", "triton"):
        g = torch.Generator().manual_seed(99)
        outs.append(llada_kernels.remask_step(logits, x, 3, mask_id=MASK, temperature=1.0,
                                              generator=g, backend=backend))
        g = torch.Generator().manual_seed(99)
        outs.append(llada_kernels.remask_step(logits, x, 3, mask_id=MASK, remasking="random",
                                              generator=g, backend=backend))
    assert torch.equal(outs[0][0], outs[2][0]) and torch.equal(outs[1][1], outs[3][1])
