"""attention(..., return_lse=True) and merge_attention: the pieces of context parallelism.

1. Every backend's lse, and the gradients of an objective that uses both out and lse, against
   an fp64 truth (FlashAttention's rule, as in test_attention_masks.py: error <= 2 x eager's in
   the same dtype + a floor). The lse gradient goes through the backward kernels' delta
   (delta_i = dO_i . O_i - dlse_i), so this is what checks that path; a planted variant that
   drops it must fail the same check.
2. Keys split in two and three (uneven, at odd places) over every mask kind, each part run
   through the op with the part of the mask (AttentionMask.keys), merged: the full result,
   forward and gradients, including parts in which a row sees no key, and rows that see no key
   at all.

tests/test_cuda_host.py runs (1) on the CUDA kernels through the host emulation.
"""

from __future__ import annotations

import pytest
import torch

import llada_kernels as lk
from llada_kernels import masks

import test_attention_masks as am

FLOOR_LSE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def lse_truth(q, k, dense, scale):
    """fp64 log-sum-exp of each row's scaled visible scores [B, Hq, Lq]; -inf for no key."""
    G = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)) * scale
    if dense is not None:
        s = s.masked_fill(~dense[:, None], float("-inf"))
    return torch.logsumexp(s, -1)


def objective_grads(fn, q, k, v, g_out, g_lse):
    """(out, lse, dq, dk, dv) of sum(out * g_out) + sum(lse * g_lse) over the finite lse."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    finite = torch.isfinite(lse)
    f = (out.double() * g_out.double()).sum() + (lse.double().where(finite, 0) * g_lse).sum()
    dq, dk, dv = torch.autograd.grad(f, (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv


def check_lse(fn, shape, kind, dtype, seed=0):
    """fn(q, k, v, mask) -> (out, lse) against the fp64 truth with the 2x rule (eager: the
    reference backend in dtype)."""
    B, Hq, Hkv, Lq, Lk, D = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = am.make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, "cpu", gen)
    mask = am.build_mask(kind, B, Lq, Lk, gen)
    dense = None if mask is None else mask.to_dense().expand(B, -1, -1)
    g_out = torch.randn(B, Hq, Lq, D, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(B, Hq, Lq, generator=gen, dtype=torch.float64)
    scale = D ** -0.5

    def truth_fn(a, b, c):
        return am.sdpa_truth(a, b, c, dense), lse_truth(a, b, dense, scale)

    truth = objective_grads(truth_fn, q.double(), k.double(), v.double(), g_out, g_lse)
    eager = objective_grads(lambda a, b, c: lk.attention(a, b, c, mask, backend="reference",
                                                         return_lse=True), q, k, v, g_out, g_lse)
    got = [x.cpu() for x in objective_grads(lambda a, b, c: fn(a, b, c, mask), q, k, v, g_out,
                                            g_lse)]
    assert got[1].dtype == torch.float32 and got[1].shape == (B, Hq, Lq)
    no_key = torch.isinf(truth[1])
    assert torch.equal(torch.isneginf(got[1]), no_key), "lse: -inf exactly where a row sees no key"
    for name, g, t, e in zip(("out", "lse", "dq", "dk", "dv"), got, truth, eager):
        assert torch.isfinite(g[~no_key] if name == "lse" else g).all(), f"{name}: non-finite"
        if name == "lse":
            g, t, e = (x.masked_fill(no_key, 0) for x in (g, t, e))
        floor = FLOOR_LSE[dtype] if name == "lse" else am.FLOOR.get(dtype, 1e-12)
        err, eager_err = am.max_err(g, t), am.max_err(e, t)
        assert err <= 2 * eager_err + floor, \
            f"{name}: error {err:.3g} > 2 x eager {eager_err:.3g} + {floor}"


def public_op(backend):
    return lambda q, k, v, m: lk.attention(q, k, v, m, backend=backend, return_lse=True)


# (B, Hq, Hkv, Lq, Lk, D, mask kind): odd lengths, GQA, Lq < Lk, rows that see no key.
CASES = [
    (2, 4, 2, 37, 37, 16, "none"),
    (2, 2, 1, 20, 70, 16, "key_padding"),
    (1, 2, 2, 70, 70, 32, "block_causal_b4"),
    (3, 2, 1, 90, 90, 16, "block_diffusion"),
    (2, 2, 1, 70, 70, 16, "empty_rows"),
    (4, 2, 1, 70, 70, 16, "documents_cu"),
]
case_id = (lambda c: f"{c[6]}-{'x'.join(map(str, c[:6]))}")


@am.needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_lse_and_its_gradient(case, dtype):
    *shape, kind = case
    check_lse(public_op("cpu"), shape, kind, dtype)


@pytest.mark.triton
@am.needs_triton
@pytest.mark.parametrize("case", CASES[1:5], ids=case_id)
def test_triton_lse_and_its_gradient(case):
    *shape, kind = case  # fp16: the interpreter's bf16 x bf16 dot is wrong (tests/conftest.py)
    check_lse(lambda q, k, v, m: lk.attention(q.to(am._triton_device()), k.to(am._triton_device()),
                                              v.to(am._triton_device()),
                                              None if m is None else m.to(am._triton_device()),
                                              backend="triton", return_lse=True),
              shape, kind, torch.float16)


def test_reference_lse_is_the_truth():
    check_lse(public_op("reference"), (2, 4, 2, 21, 33, 8), "empty_rows", torch.float32)


@am.needs_cpu
def test_dropping_the_lse_gradient_is_caught():
    """Planted bugs: the lse returned detached (its gradient never reaches the kernels), and
    the backward kernel called without grad_lse; the check must fail on both."""
    def detached(q, k, v, m):
        out, lse = lk.attention(q, k, v, m, backend="cpu", return_lse=True)
        return out, lse.detach()

    with pytest.raises(AssertionError, match="dq: error"):
        check_lse(detached, (2, 2, 1, 70, 70, 16), "block_causal_b4", torch.float32)

    class NoGradLse(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, qm, km):
            out, lse = torch.ops.llada.attention_fwd(q, k, v, qm, km, q.shape[-1] ** -0.5)
            ctx.save_for_backward(q, k, v, qm, km, out, lse)
            return out, lse

        @staticmethod
        def backward(ctx, g_out, g_lse):
            q, k, v, qm, km, out, lse = ctx.saved_tensors
            return (*torch.ops.llada.attention_bwd(g_out.contiguous(), q, k, v, qm, km, out, lse,
                                                   q.shape[-1] ** -0.5), None, None)

    def without_grad_lse(q, k, v, m):
        out, lse = NoGradLse.apply(q, k, v, *m.tensors(q.shape[0]))
        return out, lse.masked_fill(lse == float("inf"), float("-inf"))

    with pytest.raises(AssertionError, match="dq: error"):
        check_lse(without_grad_lse, (2, 2, 1, 70, 70, 16), "block_causal_b4", torch.float32)


# ---- merging over key chunks ----------------------------------------------------------------

def chunked(backend, bounds):
    """fn(q, k, v, mask) -> merge of the op over key chunks [bounds[i], bounds[i + 1])."""
    def fn(q, k, v, mask):
        Lk = k.shape[2]
        mask = mask or masks.key_padding(torch.ones(q.shape[0], Lk, dtype=torch.bool), q.shape[2])
        edges = [0, *bounds, Lk]
        parts = [lk.attention(q, k[:, :, a:b], v[:, :, a:b], mask.keys(a, b), backend=backend,
                              return_lse=True) for a, b in zip(edges, edges[1:])]
        return lk.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    return fn


MERGE_CASES = [  # (case, backend, dtype, chunk bounds)
    (CASES[0], "reference", torch.float32, (17,)),
    (CASES[2], "cpu", torch.float32, (33,)),
    (CASES[3], "cpu", torch.float32, (45, 46)),   # a one-key chunk
    (CASES[4], "cpu", torch.bfloat16, (33,)),     # rows with no key in a chunk, or in all
    (CASES[5], "cpu", torch.float32, (10, 51)),
    (CASES[1], "cpu", torch.bfloat16, (63,)),
]


@pytest.mark.parametrize("case,backend,dtype,bounds", MERGE_CASES,
                         ids=[f"{c[0][6]}-{c[1]}-{str(c[2])[6:]}-{c[3]}" for c in MERGE_CASES])
def test_merge_over_key_chunks_is_the_whole(case, backend, dtype, bounds):
    if backend == "cpu" and not am._backend.has_kernel("attention_fwd", "CPU"):
        pytest.skip("llada_kernels._C has no CPU kernel")
    *shape, kind = case
    check_lse(chunked(backend, bounds), shape, kind, dtype)


@pytest.mark.triton
@am.needs_triton
def test_triton_merge_over_key_chunks():
    dev = am._triton_device()

    def fn(q, k, v, m):
        return chunked("triton", (31,))(q.to(dev), k.to(dev), v.to(dev), m.to(dev))

    check_lse(fn, (1, 2, 1, 64, 64, 16), "block_diffusion", torch.float16)


def test_merge_of_one_part_is_itself_and_empty_parts_vanish():
    out = torch.randn(2, 3, 5, 4)
    lse = torch.randn(2, 3, 5)
    lse[0, 0, 0] = float("-inf")
    o, l = lk.merge_attention([out], [lse])
    assert torch.equal(l, lse) and torch.equal(o[lse > float("-inf")], out[lse > float("-inf")])
    assert (o[0, 0, 0] == 0).all()
    empty = torch.full_like(lse, float("-inf"))
    o2, l2 = lk.merge_attention([out, torch.full_like(out, float("nan"))], [lse, empty])
    assert torch.equal(l2, lse) and torch.equal(o2, o)


def test_merge_rejects_bad_arguments():
    out, lse = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="equal length"):
        lk.merge_attention([out, out], [lse])
    with pytest.raises(TypeError, match=r"lses\[1\] must have dtype float32; got float64"):
        lk.merge_attention([out, out], [lse, lse.double()])
    with pytest.raises(TypeError, match="lses must be float32"):
        lk.merge_attention([out], [lse.half()])
    with pytest.raises(ValueError, match=r"outs\[1\]"):
        lk.merge_attention([out, out[..., :2]], [lse, lse])
    with pytest.raises(ValueError, match="stop"):
        masks.block_causal(4, seq_len=8).keys(3, 9)


@am.needs_cpu
def test_torch_compile_fullgraph_with_the_lse_gradient():
    """One graph for two key chunks, their merge and an objective on out and lse: the same
    values and gradients as eager (the backward gets grad_lse as a tensor here)."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = am.make_qkv(2, 4, 2, 9, 24, 16, torch.float32, "cpu", gen)
    mask = masks.block_causal(4, seq_len=24, q_len=9)

    def f(q, k, v):
        out, lse = chunked("cpu", (11,))(q, k, v, mask)
        return (out ** 2).sum() + lse.where(torch.isfinite(lse), 0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    args = [x.clone().requires_grad_() for x in (q, k, v)]
    args_eager = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled(*args).backward()
    f(*args_eager).backward()
    for a, b in zip(args, args_eager):
        torch.testing.assert_close(a.grad, b.grad)
