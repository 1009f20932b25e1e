"""attention with key padding (LLaDA's bidirectional attention; `bidirectional_attention` is
its deprecated name): the reference against SDPA, then every backend against the reference.
Structured masks (block-causal, documents, the 2L mask) are in test_attention_masks.py.

Tolerance (FlashAttention's rule): a kernel's max error against the fp64 truth is at most twice
the error of eager PyTorch in the same dtype (the reference run in that dtype), plus a floor
for cases where eager happens to be exact (Lk = 1, say). The floor is a small fraction of the
dtype's resolution near 1, so a wrong kernel (errors of O(1)) always fails.

Triton cases run under the interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_bidirectional_attention.py -m triton
and are skipped otherwise (the interpreter must be on before Triton kernels are defined).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import llada_kernels as lk
from llada_kernels import _backend, masks
from llada_kernels.reference import attention as ref

FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}

# (B, Hq, Hkv, Lq, Lk, D, mask): odd lengths, Lq != Lk, GQA 1/2/4, B = 1, every D in the issue.
CASES = [
    (2, 2, 2, 7, 7, 16, "some"),
    (1, 4, 1, 1, 129, 32, "some"),
    (2, 4, 2, 129, 7, 64, "empty_row"),
    (2, 4, 4, 65, 130, 128, "none"),
    (1, 2, 2, 1, 1, 64, "full"),
    (3, 4, 1, 33, 200, 64, "some"),
    (2, 8, 2, 70, 129, 32, "empty_row"),
    (2, 2, 1, 64, 64, 40, "left_pad"),
]


def make_mask(kind, B, Lk, gen):
    if kind == "none":
        return None
    if kind == "full":
        return torch.ones(B, Lk, dtype=torch.bool)
    if kind == "half_pad":  # the first half of every row padded: whole key tiles and chunks
        return torch.arange(Lk) >= Lk // 2 + torch.zeros(B, 1, dtype=torch.long)
    if kind == "left_pad":  # batched generation: prompts left-padded to a common length
        lens = torch.randint(1, Lk + 1, (B,), generator=gen)
        return torch.arange(Lk) >= (Lk - lens)[:, None]
    m = torch.rand(B, Lk, generator=gen) < 0.7
    m[:, 0] = True  # at least one key per row
    if kind == "empty_row":
        m[0] = False
    return m


def make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device="cpu", layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def t(H, L):
        if layout == "bshd":  # [B, L, H, D] storage seen as [B, H, L, D], as models hold it
            x = torch.randn(B, L, H, D, generator=gen).transpose(1, 2)
        elif layout == "strided_d":  # no unit stride along D: the op must copy
            x = torch.randn(B, H, L, 2 * D, generator=gen)[..., ::2]
        else:
            x = torch.randn(B, H, L, D, generator=gen)
        if layout == "offset":  # contiguous, but one element off 16-byte alignment
            y = torch.empty(x.numel() + 1, device=device, dtype=dtype)[1:].view(x.shape)
            return y.copy_(x)
        return x.to(device=device, dtype=dtype)

    return t(Hq, Lq), t(Hkv, Lk), t(Hkv, Lk), gen


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def fwd_bwd(q, k, v, mask, grad, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = lk.attention(q, k, v, key_padding_mask=mask, **kw)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def check_against_reference(backend, device, shape, mask_kind, dtype, layout="contiguous", seed=0):
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v, gen = make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, device, layout, seed)
    mask = make_mask(mask_kind, B, Lk, gen)
    mask = None if mask is None else mask.to(device)
    grad = torch.randn(B, Hq, Lq, D, generator=gen).to(device=device, dtype=dtype)

    truth = fwd_bwd(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                    None if mask is None else mask.cpu(), grad.cpu().double(), backend="reference")
    eager = fwd_bwd(q.cpu(), k.cpu(), v.cpu(), None if mask is None else mask.cpu(), grad.cpu(),
                    backend="reference")
    got = fwd_bwd(q, k, v, mask, grad, backend=backend)
    for name, g, t, e in zip(("out", "dq", "dk", "dv"), got, truth, eager):
        assert g.dtype == dtype and g.shape == t.shape, name
        err, eager_err = max_err(g.cpu(), t), max_err(e, t)
        bound = 2 * eager_err + FLOOR[dtype]
        assert err <= bound, f"{name}: error {err:.3g} > 2 x eager {eager_err:.3g} + {FLOOR[dtype]}"
    if mask is not None:  # rows with no key: exactly zero, and so are their gradients
        empty = ~mask.cpu().any(-1)
        assert (got[0].cpu()[empty] == 0).all() and (got[1].cpu()[empty] == 0).all()
        padded = ~mask.cpu()[:, None, :, None].expand_as(got[2].cpu())
        assert (got[2].cpu()[padded] == 0).all() and (got[3].cpu()[padded] == 0).all()


# ---- the reference ------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_sdpa_fp64(case):
    B, Hq, Hkv, Lq, Lk, D, kind = case
    q, k, v, gen = make_inputs(B, Hq, Hkv, Lq, Lk, D, torch.float64)
    mask = make_mask(kind, B, Lk, gen)
    out, lse = ref.bidirectional_attention(q, k, v, mask, return_lse=True)
    attn_mask = None if mask is None else mask[:, None, None, :]
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    rows = torch.ones(B, dtype=torch.bool) if mask is None else mask.any(-1)
    torch.testing.assert_close(out[rows], sdpa[rows], rtol=1e-12, atol=1e-12)
    assert (out[~rows] == 0).all() and (lse[~rows] == math.inf).all()
    scores = (q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) / math.sqrt(D)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
    torch.testing.assert_close(lse[rows], torch.logsumexp(scores, -1)[rows].float())


def test_reference_gradients_zero_on_empty_rows():
    q, k, v, gen = make_inputs(2, 2, 1, 5, 6, 8, torch.float64)
    mask = make_mask("empty_row", 2, 6, gen)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ref.bidirectional_attention(q, k, v, mask).sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0] == 0).all() and (k.grad[0] == 0).all()
    torch.autograd.gradcheck(lambda a, b, c: ref.bidirectional_attention(a, b, c, mask),
                             (q.detach()[:, :, :2].requires_grad_(), k.detach().requires_grad_(),
                              v.detach().requires_grad_()))


# ---- the C++ CPU kernels ------------------------------------------------------------------

# The CPU kernel implements the structured-mask schema (llada::attention_fwd); the public op
# turns the key-padding mask into its vectors (masks.key_padding).
needs_cpu = pytest.mark.skipif("cpu" not in lk.available_backends("attention_fwd", "cpu"),
                               reason="llada_kernels._C has no CPU kernel")


def padding_masks(key_padding_mask, Lq):
    """(q_mask, k_mask) of a [B, Lk] key-padding mask, or (None, None)."""
    if key_padding_mask is None:
        return None, None
    return masks.key_padding(key_padding_mask, Lq).tensors(key_padding_mask.shape[0])


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_matches_reference(case, dtype):
    *shape, kind = case
    check_against_reference("cpu", "cpu", shape, kind, dtype)


@needs_cpu
@pytest.mark.parametrize("layout", ["bshd", "strided_d", "offset"])
def test_cpu_non_contiguous(layout):
    check_against_reference("cpu", "cpu", (2, 4, 2, 33, 70, 64), "some", torch.float32, layout)


@needs_cpu
@pytest.mark.parametrize("D", [1, 24, 200, 256])
def test_cpu_any_head_dim(D):
    check_against_reference("cpu", "cpu", (1, 2, 1, 9, 20, D), "some", torch.float32)


@needs_cpu
@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("kind", ["some", "half_pad"])
def test_cpu_backward_key_chunks(threads, kind):
    # One KV head and 5 key tiles: the backward splits the keys into min(5, threads) chunks
    # whose partial dQs are summed after; with one thread it writes dQ directly.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference("cpu", "cpu", (1, 2, 1, 70, 300, 32), kind, torch.float32)
    finally:
        torch.set_num_threads(before)


@needs_cpu
def test_cpu_lse_and_scale():
    q, k, v, gen = make_inputs(2, 4, 2, 17, 70, 32, torch.float32)
    mask = make_mask("empty_row", 2, 70, gen)
    out, lse = torch.ops.llada.attention_fwd(q, k, v, *padding_masks(mask, 17), 0.3)
    r_out, r_lse = ref.bidirectional_attention(q.double(), k.double(), v.double(), mask, 0.3,
                                               return_lse=True)
    torch.testing.assert_close(out, r_out.float(), rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, r_lse, rtol=1e-6, atol=1e-6)  # +inf on the empty row


@needs_cpu
@pytest.mark.parametrize("shape", [(0, 2, 1, 5, 5), (2, 2, 1, 0, 5), (2, 2, 1, 5, 0)])
def test_cpu_empty(shape):
    B, Hq, Hkv, Lq, Lk = shape
    q, k, v, _ = make_inputs(B, Hq, Hkv, Lq, Lk, 16, torch.float32)
    out, dq, dk, dv = fwd_bwd(q, k, v, None, torch.ones_like(q), backend="cpu")
    assert out.shape == q.shape and (out == 0).all() and (dq == 0).all()
    assert dk.shape == k.shape and dv.shape == v.shape


@needs_cpu
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(masked):
    q, k, v, gen = make_inputs(2, 4, 2, 9, 13, 16, torch.float32)
    mask = make_mask("empty_row", 2, 13, gen) if masked else None
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.llada.attention_fwd, (q, k, v, *padding_masks(mask, 9), 0.25))


@needs_cpu
def test_torch_compile_fullgraph():
    q, k, v, gen = make_inputs(2, 4, 2, 9, 13, 16, torch.float32)
    mask = make_mask("empty_row", 2, 13, gen)

    def loss(q, k, v):
        return (lk.attention(q, k, v, key_padding_mask=mask, backend="cpu") ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor")
    args = [x.clone().requires_grad_() for x in (q, k, v)]
    args_eager = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled(*args).backward()
    loss(*args_eager).backward()
    for a, b in zip(args, args_eager):
        torch.testing.assert_close(a.grad, b.grad)


# ---- argument checks ----------------------------------------------------------------------

def _bad(msg, q, k, v, key_padding_mask=None, exc=ValueError, **kw):
    with pytest.raises(exc, match=msg):
        lk.attention(q, k, v, key_padding_mask=key_padding_mask, **kw)


def test_bad_inputs():
    q, k, v, _ = make_inputs(2, 4, 2, 5, 6, 16, torch.float32)
    _bad("q must have 4 dimensions", q[0], k, v)
    _bad(r"k must have shape \[2, 'Hkv', 'Lk', 16\]", q, k[..., :8], v)
    _bad(r"v must have shape \[2, 2, 6, 16\]", q, k, v[:, :1])
    _bad(r"query heads Hq \(4\) must be a multiple of the KV heads Hkv \(3\)",
         q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1))
    _bad("k must have dtype float32", q, k.half(), v, exc=TypeError)
    _bad("key_padding_mask must have dtype bool", q, k, v, torch.ones(2, 6), exc=TypeError)
    _bad(r"key_padding_mask must have shape \[2, 6\]", q, k, v, torch.ones(2, 5, dtype=torch.bool))
    _bad("k is on meta but q is on cpu", q, k.to("meta"), v)
    _bad("key_padding_mask is on meta", q, k, v, torch.ones(2, 6, dtype=torch.bool, device="meta"))
    _bad("scale must be finite", q, k, v, scale=float("nan"))
    _bad("backend 'cuda'", q, k, v, backend="cuda", exc=lk.BackendUnavailable)


@needs_cpu
def test_bad_head_dim_for_backend():
    q, k, v, _ = make_inputs(1, 1, 1, 3, 3, 300, torch.float32)
    _bad(r"head dimension D must be one of .* on the cpu backend; got 300", q, k, v, backend="cpu")
    lk.attention(q, k, v, backend="reference")  # the reference runs any D


# ---- Triton (interpreter on CPU tensors, or a GPU) ----------------------------------------

TRITON_CASES = [
    (1, 2, 1, 7, 19, 16, "some"),
    (2, 2, 2, 33, 9, 32, "empty_row"),
    (1, 4, 2, 5, 70, 64, "none"),
    (1, 2, 1, 17, 40, 128, "left_pad"),
]


def _triton_device():
    if torch.cuda.is_available() and not _backend.interpreting():
        return "cuda"
    return "cpu"


needs_triton = pytest.mark.skipif(
    "triton" not in lk.available_backends("attention_fwd", _triton_device()),
    reason="Triton needs a GPU or TRITON_INTERPRET=1")


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_matches_reference(case, dtype):
    *shape, kind = case
    check_against_reference("triton", _triton_device(), shape, kind, dtype)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("layout", ["bshd", "offset"])
def test_triton_non_contiguous(layout):
    check_against_reference("triton", _triton_device(), (1, 2, 1, 9, 20, 32), "some",
                            torch.bfloat16, layout)


@pytest.mark.triton
@needs_triton
def test_triton_opcheck():
    q, k, v, gen = make_inputs(1, 2, 1, 9, 13, 16, torch.float16, _triton_device())
    qm, km = masks.key_padding(make_mask("some", 1, 13, gen), 9).to(q.device).tensors(1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.llada.attention_fwd_triton, (q, k, v, qm, km, 0.25))


@pytest.mark.triton
@needs_triton
def test_triton_rejects_unsupported():
    q, k, v, _ = make_inputs(1, 1, 1, 3, 3, 48, torch.bfloat16, _triton_device())
    _bad(r"head dimension D must be one of \[16, 32, 64, 128\] on the triton backend; got 48",
         q, k, v, backend="triton")
    q, k, v, _ = make_inputs(1, 1, 1, 3, 3, 16, torch.float32, _triton_device())
    _bad("q.dtype must be one of .* on the triton backend; got torch.float32", q, k, v,
         backend="triton")


# ---- CUDA C++ (a GPU) ---------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available()
    or "cuda" not in lk.available_backends("attention_fwd", "cuda"),
    reason="needs a GPU and a build with CUDA kernels")

CUDA_CASES = CASES[2:6] + [(2, 8, 2, 300, 1000, 128, "left_pad"), (1, 4, 4, 1, 4096, 64, "some")]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [c for c in CUDA_CASES if c[5] in (64, 128)], ids=str)
def test_cuda_matches_reference(case, dtype):
    *shape, kind = case
    check_against_reference("cuda", "cuda", shape, kind, dtype)


@needs_cuda
@pytest.mark.skipif(_backend.interpreting(), reason="compiled Triton only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_triton_gpu_matches_reference(case, dtype):
    *shape, kind = case
    check_against_reference("triton", "cuda", shape, kind, dtype)


@needs_cuda
@pytest.mark.parametrize("layout", ["bshd", "strided_d", "offset"])
def test_cuda_non_contiguous(layout):
    check_against_reference("cuda", "cuda", (2, 4, 2, 70, 129, 64), "some", torch.bfloat16, layout)
