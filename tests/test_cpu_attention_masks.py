"""The C++ CPU kernel of llada::attention_fwd / attention_bwd with structured masks, called
directly (the public API over it lives in ops/attention.py and llada_kernels/masks.py).

Masks (csrc/ops.cpp): q_mask [B, 2, Lq] = (doc, level) per query, k_mask [B, 3, Lk] = (doc, lo,
hi) per key; query i sees key j iff doc_q(i) == doc_k(j) and lo(j) <= level(i) <= hi(j). The
builders below follow ATTN_MASK_SPEC.md's examples; each case turns its vectors into the dense
boolean mask and compares with float64 attention under that mask (itself checked against
float64 SDPA), forward and all three gradients.

Tolerance (FlashAttention's rule, as tests/test_bidirectional_attention.py): the kernel's max error
against the fp64 truth is at most twice eager PyTorch's in the same dtype, plus a small floor.
Every case runs under each CPU capability this machine supports (csrc/isa.h).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llada_kernels  # noqa: F401  (registers the ops)

INF = 2**31 - 1
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
CAPABILITIES = torch.ops.llada.cpu_capabilities()


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    """Runs the test under one CPU capability, then restores the one in use."""
    before = torch.ops.llada.cpu_capability()
    torch.ops.llada.cpu_capability(request.param)
    yield request.param
    torch.ops.llada.cpu_capability(before)


# ---- mask builders (O(L) vectors, from the spec) ------------------------------------------

def vectors(qdoc, level, kdoc, lo, hi):
    """[B, Lq] and [B, Lk] rows into q_mask [B, 2, Lq] and k_mask [B, 3, Lk], int32."""
    q = torch.stack([qdoc, level], 1).to(torch.int32).contiguous()
    k = torch.stack([kdoc, lo, hi], 1).to(torch.int32).contiguous()
    return q, k


def padding_masks(valid, Lq):
    """valid [B, Lk] bool: every query has doc 0, level 0; a padded key the empty [1, 0]."""
    B, Lk = valid.shape
    v = valid.long()
    return vectors(torch.zeros(B, Lq).long(), torch.zeros(B, Lq).long(), torch.zeros(B, Lk).long(),
                   1 - v, v * INF)


def block_causal(B, Lq, Lk, b, q_offsets):
    """Query i of row n sits at absolute position q_offsets[n] + i; block(x) = x // b."""
    pos = torch.tensor(q_offsets)[:, None] + torch.arange(Lq)
    keys = torch.arange(Lk).expand(B, Lk)
    return vectors(torch.zeros(B, Lq).long(), pos // b, torch.zeros(B, Lk).long(), keys // b,
                   torch.full((B, Lk), INF))


def documents(lengths, b=None):
    """Packed documents per row (lengths: a list per row, each summing to L). Within a document,
    block-causal with blocks restarting at its start (b), or bidirectional (b None)."""
    rows = []
    for lens in lengths:
        doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        start = torch.repeat_interleave(torch.tensor([0] + list(torch.tensor(lens).cumsum(0)[:-1])),
                                        torch.tensor(lens))
        rel = torch.arange(len(doc)) - start
        lvl = rel // b if b else torch.zeros_like(rel)
        hi = torch.full_like(rel, INF)
        rows.append((doc, lvl, doc, lvl, hi))
    return vectors(*[torch.stack(x) for x in zip(*rows)])


def two_l(B, L, b):
    """The 2L block-diffusion mask over [x_t ; x_0]: noisy block n has level 2n and keys
    [2n, 2n]; clean block n has level 2n + 1 and keys [2n + 1, INF]."""
    n = torch.arange(L) // b
    level = torch.cat([2 * n, 2 * n + 1]).expand(B, 2 * L)
    lo = level
    hi = torch.cat([2 * n, torch.full((L,), INF)]).expand(B, 2 * L)
    zeros = torch.zeros(B, 2 * L).long()
    return vectors(zeros, level, zeros, lo, hi)


def dense(q_mask, k_mask):
    """The [B, Lq, Lk] boolean mask the vectors describe."""
    qdoc, level = q_mask[:, 0, :, None].long(), q_mask[:, 1, :, None].long()
    kdoc, lo, hi = (k_mask[:, i, None, :].long() for i in range(3))
    return (qdoc == kdoc) & (lo <= level) & (level <= hi)


# ---- the dense reference -----------------------------------------------------------------

def dense_attention(q, k, v, visible, scale):
    """Eager attention under a dense [B, Lq, Lk] mask, in the inputs' dtype; rows that see no
    key give zeros (and zero gradients)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    vis = visible[:, None]
    has = vis.any(-1, keepdim=True)
    s = s.masked_fill(~vis, float("-inf")).masked_fill(~has, 0)
    return (torch.softmax(s, -1) * has) @ v


def lse_of(q, k, visible, scale):
    G = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s.masked_fill(~visible[:, None], float("-inf")), -1)
    return lse.masked_fill(~visible[:, None].any(-1), math.inf)


def grads(fn, q, k, v, grad):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def ours(q, k, v, q_mask, k_mask, grad, scale):
    """The kernels, forward then the backward op directly."""
    out, lse = torch.ops.llada.attention_fwd(q, k, v, q_mask, k_mask, scale)
    dq, dk, dv = torch.ops.llada.attention_bwd(grad, q, k, v, q_mask, k_mask, out, lse, scale)
    return (out, dq, dk, dv), lse


def make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0, q_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=gen) * q_scale
    k, v = torch.randn(B, Hkv, Lk, D, generator=gen), torch.randn(B, Hkv, Lk, D, generator=gen)
    grad = torch.randn(B, Hq, Lq, D, generator=gen)
    return (x.to(dtype) for x in (q, k, v, grad))


def errors(q, k, v, grad, q_mask, k_mask, dtype, kernel=ours):
    """Max error of the kernel and of eager (same dtype) against the fp64 truth, per output."""
    scale = 1 / math.sqrt(q.shape[-1])
    visible = dense(q_mask, k_mask)
    truth = grads(lambda a, b, c: dense_attention(a, b, c, visible, scale),
                  *(x.double() for x in (q, k, v, grad)))
    eager = grads(lambda a, b, c: dense_attention(a, b, c, visible, scale), q, k, v, grad)
    got, lse = kernel(q, k, v, q_mask, k_mask, grad, scale)
    out = {}
    for name, g, t, e in zip(("out", "dq", "dk", "dv"), got, truth, eager):
        assert g.dtype == dtype and g.shape == t.shape, name
        out[name] = ((g.double() - t).abs().max().item(), (e.double() - t).abs().max().item(),
                     t.abs().max().item())
    return out, got, lse, visible


def check(q, k, v, grad, q_mask, k_mask, dtype, kernel=ours, lse_rounding=False):
    """The FlashAttention rule per output. With lse_rounding, the bound of the gradients also
    allows the documented error of an fp32 lse: each row's recomputed probabilities carry a
    common relative error of up to |lse| 2^-24 (lse's own rounding), which eager's softmax does
    not have; it matters only where |lse| is far above 1 (scores of 1e3 and up)."""
    errs, got, lse, visible = errors(q, k, v, grad, q_mask, k_mask, dtype, kernel)
    lse_max = lse[torch.isfinite(lse)].abs().max().item() if torch.isfinite(lse).any() else 0.0
    for name, (err, eager_err, scale) in errs.items():
        bound = 2 * eager_err + FLOOR[dtype]
        if lse_rounding and name != "out":
            bound += 2.0**-23 * lse_max * scale
        assert err <= bound, f"{name}: error {err:.3g} > 2 x eager {eager_err:.3g} + {FLOOR[dtype]}"
    out, dq, dk, dv = got
    empty = ~visible.any(-1)                                    # [B, Lq]: rows that see no key
    assert (out.transpose(1, 2)[empty] == 0).all() and (dq.transpose(1, 2)[empty] == 0).all()
    assert (lse.transpose(1, 2)[empty] == math.inf).all()
    unseen = ~visible.any(1)                                    # [B, Lk]: keys no query sees
    assert (dk.transpose(1, 2)[unseen] == 0).all() and (dv.transpose(1, 2)[unseen] == 0).all()
    torch.testing.assert_close(lse[~empty[:, None].expand_as(lse)].double(),
                               lse_of(q, k, visible, 1 / math.sqrt(q.shape[-1]))[
                                   ~empty[:, None].expand_as(lse)],
                               rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-4)
    for t in got:
        assert torch.isfinite(t).all()


# ---- the builders and the reference themselves ---------------------------------------------

def test_two_l_mask_by_hand():
    """L = 4, b = 2: noisy n sees noisy n and clean m < n; clean n sees clean m <= n."""
    x = [[1, 1, 0, 0, 0, 0, 0, 0],
         [1, 1, 0, 0, 0, 0, 0, 0],
         [0, 0, 1, 1, 1, 1, 0, 0],
         [0, 0, 1, 1, 1, 1, 0, 0],
         [0, 0, 0, 0, 1, 1, 0, 0],
         [0, 0, 0, 0, 1, 1, 0, 0],
         [0, 0, 0, 0, 1, 1, 1, 1],
         [0, 0, 0, 0, 1, 1, 1, 1]]
    assert dense(*two_l(1, 4, 2))[0].int().tolist() == x


def test_block_causal_and_documents_by_hand():
    # b = 2, queries at positions 2..4 of 5 keys: block(i) >= block(j).
    assert dense(*block_causal(1, 3, 5, 2, [2]))[0].int().tolist() == [
        [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # Documents of lengths 1, 3 with b = 2: blocks restart at each start.
    assert dense(*documents([[1, 3]], b=2))[0].int().tolist() == [
        [1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    assert dense(*padding_masks(torch.tensor([[False, True, True]]), 2))[0].int().tolist() == [
        [0, 1, 1], [0, 1, 1]]


def test_reference_matches_sdpa_fp64():
    q, k, v, _ = make_qkv(2, 4, 2, 40, 40, 16, torch.float64)
    q_mask, k_mask = documents([[1, 25, 14], [40]], b=4)
    visible = dense(q_mask, k_mask)
    got = dense_attention(q, k, v, visible, 0.25)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=0.25,
                                          enable_gqa=True)
    torch.testing.assert_close(got, sdpa, rtol=1e-12, atol=1e-12)


# ---- the kernel against the reference -------------------------------------------------------

def _kv_offsets_case():
    # KV cache: the current block's 40 queries against 150 keys, at different positions per row.
    return (2, 4, 2, 40, 150, 32), block_causal(2, 40, 150, 16, [110, 60])


def _padding_both_ends():
    valid = torch.zeros(3, 100, dtype=torch.bool)
    valid[0, 5:90] = valid[1, :60] = valid[2, 30:] = True
    return (3, 2, 1, 70, 100, 32), padding_masks(valid, 70)


def _empty_rows():
    # Queries of document 7 see nothing (no key has it), mixed into tiles with rows that do.
    q_mask, k_mask = documents([[50, 80], [130]], b=None)
    q_mask[0, 0, 10:30] = 7
    q_mask[1, 0, 100:] = 7
    return (2, 2, 2, 130, 130, 16), (q_mask, k_mask)


def _two_l_with_documents_and_padding():
    q_mask, k_mask = two_l(2, 48, 8)
    q_mask[1, 0, 30:48] = q_mask[1, 0, 78:] = 1  # row 1: a second document in each half
    k_mask[1, 0, 30:48] = k_mask[1, 0, 78:] = 1
    k_mask[0, 1, 90:], k_mask[0, 2, 90:] = 1, 0  # row 0: its last six clean keys padded
    return (2, 4, 1, 96, 96, 64), (q_mask, k_mask)


CASES = {
    **{f"block_causal_b{b}": ((2, 4, 2, 130, 130, 32), block_causal(2, 130, 130, b, [0, 0]))
       for b in (1, 4, 32, 37)},
    "kv_cache_offsets": _kv_offsets_case(),
    "documents_1_to_4": ((3, 2, 1, 70, 70, 64),
                         documents([[1, 30, 2, 37], [70], [44, 26]], b=None)),
    "documents_block_causal": ((3, 2, 2, 70, 70, 24),
                               documents([[1, 30, 2, 37], [69, 1], [44, 26]], b=8)),
    "two_l": ((2, 2, 2, 100, 100, 64), two_l(2, 50, 16)),
    "two_l_documents_padding": _two_l_with_documents_and_padding(),
    "key_padding_both_ends": _padding_both_ends(),
    "empty_rows": _empty_rows(),
    "no_mask_d128": ((1, 2, 1, 65, 129, 128), (None, None)),
}


def _run_case(name, dtype, seed=0):
    (B, Hq, Hkv, Lq, Lk, D), (q_mask, k_mask) = CASES[name]
    q, k, v, grad = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed)
    if q_mask is None:  # the kernel's "every key visible"; the reference needs the vectors
        ones = torch.ones(B, Lk, dtype=torch.bool)
        check(q, k, v, grad, *padding_masks(ones, Lq), dtype,
              kernel=lambda q, k, v, qm, km, g, s: ours(q, k, v, None, None, g, s))
    else:
        check(q, k, v, grad, q_mask, k_mask, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype, capability):
    _run_case(name, dtype)


@pytest.mark.parametrize("name", ["block_causal_b37", "two_l_documents_padding", "empty_rows"])
def test_matches_reference_fp16(name, capability):
    _run_case(name, torch.float16)


@pytest.mark.parametrize("threads", [1, 3])
def test_backward_key_chunks(threads):
    # One KV head and 5 key tiles: the backward splits the keys into chunks (partial dQs).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v, grad = make_qkv(1, 2, 1, 70, 300, 32, torch.float32)
        check(q, k, v, grad, *block_causal(1, 70, 300, 32, [230]), torch.float32)
    finally:
        torch.set_num_threads(before)


def test_bf16_without_onednn():
    # With oneDNN off, bf16 is widened to fp32 and the products fall back to ATen's gemm.
    q, k, v, grad = make_qkv(2, 2, 1, 70, 70, 32, torch.bfloat16)
    with torch.backends.mkldnn.flags(enabled=False):
        check(q, k, v, grad, *two_l(2, 35, 8), torch.bfloat16)


# ---- huge scores (issue 9, item 6) ------------------------------------------------------------

@pytest.mark.parametrize("q_scale", [1e4, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_scores(q_scale, dtype, capability):
    """q x 1e4 and q x 1e30 (issue 9, item 6: the old kernel's dQ and dK were off by 1e24 and
    dV by 74%). The backward recomputes the scores exactly as the forward formed them, subtracts
    lse before scaling to base 2 and takes delta from the product that forms dP, so the one
    documented difference from eager left is lse's own rounding (see check)."""
    q, k, v, grad = make_qkv(2, 2, 1, 70, 70, 32, dtype, q_scale=q_scale)
    for masks in (block_causal(2, 70, 70, 8, [0, 0]),
                  padding_masks(torch.ones(2, 70, dtype=torch.bool), 70)):
        check(q, k, v, grad, *masks, dtype, lse_rounding=True)
    if q_scale == 1e30:  # one key dominates every row: the output is its value row, exactly
        q_mask, k_mask = masks
        (out, dq, dk, dv), _ = ours(q, k, v, q_mask, k_mask, grad, 1 / math.sqrt(32))
        hot = (q.double() @ k.double().transpose(-1, -2)).argmax(-1)          # [B, H, Lq]
        assert torch.equal(out, torch.gather(v.expand_as(q), 2, hot[..., None].expand_as(q)))
        assert (dq == 0).all() and (dk == 0).all()


# ---- tiles the mask skips are never computed --------------------------------------------------

def _skip_probe(kernel_fwd_bwd):
    """Block-causal with b = 256 over 512 keys: queries 0..255 see keys 0..255 only, and every
    tile pair (query tile, key tile) of theirs against keys 256.. is skipped for any tile size
    dividing 256. NaN in V of keys 256.. reaches those queries only if a skipped pair is computed
    (0 x NaN). Returns whether their outputs and dQ are finite and correct."""
    q, k, v, grad = make_qkv(1, 2, 1, 512, 512, 16, torch.float32)
    q_mask, k_mask = block_causal(1, 512, 512, 256, [0])
    v_nan = v.clone()
    v_nan[:, :, 256:] = float("nan")
    out, dq = kernel_fwd_bwd(q, k, v_nan, grad, q_mask, k_mask)
    clean = v.clone()
    clean[:, :, 256:] = 0
    ref = grads(lambda a, b, c: dense_attention(a, b, c, dense(q_mask, k_mask), 0.25),
                q.double(), k.double(), clean.double(), grad.double())
    rows = slice(0, 256)
    return (torch.isfinite(out[:, :, rows]).all() and torch.isfinite(dq[:, :, rows]).all()
            and torch.allclose(out[:, :, rows].double(), ref[0][:, :, rows], atol=1e-5)
            and torch.allclose(dq[:, :, rows].double(), ref[1][:, :, rows], atol=1e-5))


def test_skipped_tiles_are_never_computed(capability):
    def kernel(q, k, v, grad, q_mask, k_mask):
        (out, dq, _, _), _ = ours(q, k, v, q_mask, k_mask, grad, 0.25)
        return out, dq
    assert _skip_probe(kernel)


def test_skip_probe_catches_a_kernel_that_computes_every_tile():
    # The planted bug: dense attention computes every pair, so the NaN values reach the rows.
    def dense_kernel(q, k, v, grad, q_mask, k_mask):
        out, dq, _, _ = grads(lambda a, b, c: dense_attention(a, b, c, dense(q_mask, k_mask), 0.25),
                              q, k, v, grad)
        return out, dq
    assert not _skip_probe(dense_kernel)


def test_checker_catches_an_ignored_mask():
    # The planted bug: a kernel that drops the mask fails the FlashAttention-rule check.
    q, k, v, grad = make_qkv(1, 2, 1, 70, 70, 32, torch.float32)
    with pytest.raises(AssertionError, match="error"):
        check(q, k, v, grad, *block_causal(1, 70, 70, 4, [0]), torch.float32,
              kernel=lambda q, k, v, qm, km, g, s: ours(q, k, v, None, None, g, s))


# ---- schema plumbing and bad input --------------------------------------------------------------

def test_opcheck_with_masks():
    q, k, v, _ = make_qkv(2, 4, 2, 9, 13, 16, torch.float32)
    q_mask, k_mask = block_causal(2, 9, 13, 4, [4, 0])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.llada.attention_fwd, (q, k, v, q_mask, k_mask, 0.25))


def test_bad_masks_are_named():
    q, k, v, _ = make_qkv(2, 2, 1, 9, 13, 16, torch.float32)
    q_mask, k_mask = block_causal(2, 9, 13, 4, [4, 0])
    with pytest.raises(RuntimeError, match="q_mask and k_mask must both be given"):
        torch.ops.llada.attention_fwd(q, k, v, None, k_mask, 0.25)
    with pytest.raises(RuntimeError, match=r"k_mask must be a contiguous int32 CPU tensor \[2, 3, 13\]"):
        torch.ops.llada.attention_fwd(q, k, v, q_mask, k_mask.long(), 0.25)
    with pytest.raises(RuntimeError, match=r"q_mask must be a contiguous int32 CPU tensor \[2, 2, 9\]"):
        torch.ops.llada.attention_fwd(q, k, v, q_mask[:, :, :5].contiguous(), k_mask, 0.25)
    with pytest.raises(RuntimeError, match=r"head dimension must be in \[1, 256\]"):
        torch.ops.llada.attention_fwd(*(torch.zeros(1, 1, 2, 300) for _ in range(3)), None, None, 1.0)
