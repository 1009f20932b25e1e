"""The C++ CPU remask_step kernel against the eager reference (helper's own checks; the lead
owns tests/test_remask*.py)."""

import math

import pytest
import torch

import llada_kernels
from llada_kernels._backend import available_backends

pytestmark = pytest.mark.skipif("cpu" not in available_backends("remask_step", "cpu"),
                                reason="C++ CPU kernels not built")

MASK = 0  # mask_id in these tests; token ids drawn from [1, V)


def _inputs(B, L, V, dtype, masked=0.7, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    s = 2 if strided else 1  # strided: every other position of a longer sequence, x too
    logits = (torch.randn(B, s * L, V, generator=g) * 3).to(dtype)
    x = torch.randint(1, max(V, 2), (B, s * L), generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < masked, MASK, x)
    return logits[:, ::s], x[:, ::s]


def _both(logits, x, k, **kw):
    ref = llada_kernels.remask_step(logits, x, k, mask_id=MASK, backend="reference", **kw)
    cpu = llada_kernels.remask_step(logits, x, k, mask_id=MASK, backend="cpu", **kw)
    return ref, cpu


def _assert_same(ref, cpu):
    assert cpu[0].dtype == torch.int64 and cpu[1].dtype == torch.bool
    assert cpu[0].is_contiguous() and cpu[1].is_contiguous()
    torch.testing.assert_close(cpu[1], ref[1], rtol=0, atol=0)
    torch.testing.assert_close(cpu[0], ref[0], rtol=0, atol=0)


MODES = ("low_confidence", "margin", "entropy")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("remasking", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,V", [(1, 1, 1), (1, 7, 2), (3, 33, 1000), (2, 20, 4099), (1, 5, 17)])
def test_greedy_matches_reference(B, L, V, dtype, remasking):
    logits, x = _inputs(B, L, V, dtype, seed=B * L * V)
    for k in (0, 1, 3, L + 5):
        _assert_same(*_both(logits, x, k, remasking=remasking))
    k = torch.arange(B) % (L + 2)  # per-row k, some 0, some above the candidates
    end = torch.arange(B) * L // max(B - 1, 1)  # per-row block_end, 0 .. L
    _assert_same(*_both(logits, x, k, remasking=remasking, block_end=end))
    _assert_same(*_both(logits, x, 2, remasking=remasking, block_end=L // 2))


@pytest.mark.parametrize("remasking", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_options(dtype, remasking):
    B, L, V = 2, 24, 1001
    logits, x = _inputs(B, L, V, dtype, seed=1, strided=True)
    assert logits.stride(1) == 2 * V and not x.is_contiguous()
    un = (torch.randn(B, L, V, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    special = dict(suppress_ids=[0, 5, 6, V - 1], zero_confidence_ids=[6, 7, 500])
    _assert_same(*_both(logits, x, 3, remasking=remasking, **special))
    _assert_same(*_both(logits, x, 2, remasking=remasking, uncond_logits=un, cfg_scale=1.5))
    # threshold: something between commits and none
    for t in (-1e9, 0.05, -3.0, 0.5, 2.0):
        _assert_same(*_both(logits, x, 1, remasking=remasking, threshold=t))
        _assert_same(*_both(logits, x, 0, remasking=remasking, threshold=t))
    # the argmax is a zero-confidence id: its confidence is 0
    top = logits.float().argmax(-1).flatten().unique().tolist()[:4]
    _assert_same(*_both(logits, x, 5, remasking=remasking, zero_confidence_ids=top))
    _assert_same(*_both(logits, x, 5, remasking=remasking, suppress_ids=top))


@pytest.mark.parametrize("remasking", MODES)
def test_layouts_and_edges(remasking):
    B, L, V = 3, 10, 300
    t = torch.randn(L, B, V) * 3
    logits = t.transpose(0, 1)  # strides (V, B * V, 1)
    x = torch.full((B, L), MASK)
    _assert_same(*_both(logits, x, 4, remasking=remasking))  # all masked
    _assert_same(*_both(logits, x, L, remasking=remasking))  # everything committed
    _assert_same(*_both(logits, torch.ones(B, L, dtype=torch.long), 4, remasking=remasking))
    _assert_same(*_both(logits[:, :0], x[:, :0], 4, remasking=remasking))  # L = 0
    # V = 2 with one id suppressed: every confidence ties, position decides
    _assert_same(*_both(logits[..., :2], x, 3, remasking=remasking, suppress_ids=[1]))
    # tied maxima: x0 is the lowest id, and equal confidences commit the lower position first
    tied = torch.zeros(B, L, V)
    tied[..., [9, 5, 200]] = 4.0
    _assert_same(*_both(tied, x, 4, remasking=remasking))
    x_new, transfer = llada_kernels.remask_step(tied, x, 4, mask_id=MASK, remasking=remasking,
                                                backend="cpu")
    assert (x_new[transfer] == 5).all() and transfer[:, :4].all() and not transfer[:, 4:].any()
    # rows whose confidence logits are all -inf score 0
    ninf = logits.clone()
    ninf[0, :5] = float("-inf")
    ninf[1, :, 3:40] = float("-inf")  # some -inf logits in a row: exp 0, and 0 log 0 = 0
    _assert_same(*_both(ninf, x, 6, remasking=remasking))
    _assert_same(*_both(logits[..., :3], x, 6, remasking=remasking, zero_confidence_ids=[0, 1, 2]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_remasking_commits_k_candidates(dtype):
    B, L, V = 3, 40, 257
    logits, x = _inputs(B, L, V, dtype)
    cand = x == MASK
    k = torch.tensor([0, 5, 100])
    for T in (0.0, 1.0):
        x_new, transfer = llada_kernels.remask_step(logits, x, k, mask_id=MASK, remasking="random",
                                                    temperature=T, backend="cpu")
        assert torch.equal(transfer.sum(1), torch.minimum(k, cand.sum(1)))
        assert not (transfer & ~cand).any()
        assert torch.equal(x_new[~transfer], x[~transfer])
        if T == 0:
            assert torch.equal(x_new[transfer], logits.float().argmax(-1)[transfer])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_frequencies(dtype):
    """x0 at temperature T follows softmax(logits / T): chi-square over 4000 positions."""
    V, L, T = 6, 4000, 0.7
    row = torch.tensor([1.0, 0.5, -0.3, 2.0, 0.0, -1.0]).to(dtype)
    logits = row.expand(1, L, V)
    x = torch.full((1, L), MASK)
    torch.manual_seed(0)
    x_new, transfer = llada_kernels.remask_step(logits, x, L, mask_id=MASK, temperature=T,
                                                backend="cpu", suppress_ids=[4])
    assert transfer.all()
    counts = torch.bincount(x_new.flatten(), minlength=V).double()
    assert counts[4] == 0
    p = torch.softmax(row.double().index_fill(0, torch.tensor([4]), -math.inf) / T, 0)
    keep = p > 0
    chi2 = ((counts[keep] - L * p[keep]) ** 2 / (L * p[keep])).sum().item()
    assert chi2 < 20.5  # 4 degrees of freedom: p ~ 4e-4
    # a different seed draws differently, the same seed the same
    torch.manual_seed(0)
    again = llada_kernels.remask_step(logits, x, L, mask_id=MASK, temperature=T, backend="cpu",
                                      suppress_ids=[4])[0]
    assert torch.equal(again, x_new)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_sampling_is_exact_under_pruning(dtype):
    """The kernel skips ids whose noisy logit is bounded below the best; its x0 must equal
    the exhaustive argmax of l + T g over the contract's noise."""
    B, L, V = 1, 32, 3001
    logits, _ = _inputs(B, L, V, dtype)
    logits = logits.float()
    x = torch.full((B, L), MASK)
    seed = torch.tensor([1234])
    for T in (0.05, 0.5, 1.0, 3.0, 30.0):
        x0 = torch.ops.llada.remask_step(logits, None, 0.0, x, torch.tensor([L]), torch.tensor([L]),
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
    # a wide sample: every value finite, mean Euler-Mascheroni, variance pi^2 / 6
    bits = torch.randint(-(2**63), 2**63 - 1, (200_000,), generator=torch.Generator().manual_seed(0))
    s = torch.ops.llada.gumbel_from_bits(bits).double()
    assert torch.isfinite(s).all()
    assert abs(s.mean().item() - 0.5772156649) < 0.01
    assert abs(s.var().item() - math.pi**2 / 6) < 0.03


@pytest.mark.parametrize("remasking", MODES)
def test_confidence_accuracy(remasking):
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
                                                 threshold=t.item(), backend="cpu")[1]
            assert transfer[0, l].item() == expect, (l, c[0, l].item(), t.item())
