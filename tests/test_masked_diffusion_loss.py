"""masked_diffusion_loss and its fused-linear form: the reference against LLaDA's GUIDELINES.md
formulas, then every backend against the reference, value and gradients.

Tolerance rule: a kernel's error against the float64 definition may be at most twice the error of
the eager reference in the same precision, plus two units in the last place of the output dtype
(the eager error can be zero by luck). See `assert_as_accurate`.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (tests/conftest.py does too)

import llada_kernels  # noqa: E402,F401
from llada_kernels import _backend  # noqa: E402
from llada_kernels import fused_linear_masked_diffusion_loss, masked_diffusion_loss  # noqa: E402
from llada_kernels import training  # noqa: E402
from llada_kernels.reference import loss as ref  # noqa: E402

# Triton on CPU tensors needs the interpreter; on a GPU machine tests/gpu covers it on CUDA tensors.
TRITON = [pytest.mark.triton, pytest.mark.skipif(not _backend.interpreting(), reason="TRITON_INTERPRET=1 is off")]
BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton", marks=TRITON)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LLADA_V = 126464


# --------------------------------------------------------------------------------------------
# Inputs and comparison
# --------------------------------------------------------------------------------------------

def make_inputs(B, L, V, *, dtype=torch.float32, masked=0.5, scale=3.0, p_shape="B", eps=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (B, L), generator=g)
    is_masked = torch.rand(B, L, generator=g) < masked
    shape = (B,) if p_shape == "B" else (B, L)
    p_mask = torch.rand(shape, generator=g) * 0.9 + 0.1 if eps is None else torch.full(shape, eps)
    return logits, targets, is_masked, p_mask


def ulp(dtype):
    return torch.finfo(dtype).eps


def assert_as_accurate(out, eager, exact, what):
    """|out - exact| <= 2 |eager - exact| + 2 ulp(out.dtype) * max|exact|, in max norm."""
    out64, eager64, exact64 = out.double(), eager.double(), exact.double()
    assert torch.isfinite(out64).all() == torch.isfinite(exact64).all(), f"{what}: non-finite values"
    err = (out64 - exact64).abs().max().item() if out.numel() else 0.0
    eager_err = (eager64 - exact64).abs().max().item() if out.numel() else 0.0
    floor = 2 * ulp(out.dtype) * (exact64.abs().max().item() if out.numel() else 0.0)
    assert err <= 2 * eager_err + floor, (
        f"{what}: error {err:.3g} vs the eager reference's {eager_err:.3g} (floor {floor:.3g})")


def loss_and_grad(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, *args, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def check_backend(backend, logits, targets, masked, p_mask, **kw):
    out, grad = loss_and_grad(masked_diffusion_loss, logits, targets, masked, p_mask, backend=backend, **kw)
    eager, eager_grad = loss_and_grad(ref.masked_diffusion_loss, logits, targets, masked, p_mask, **kw)
    exact, exact_grad = loss_and_grad(ref.masked_diffusion_loss, logits.double(), targets, masked,
                                      p_mask.double(), **kw)
    assert out.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert grad.dtype == logits.dtype
    assert_as_accurate(out, eager, exact, "loss")
    assert_as_accurate(grad, eager_grad, exact_grad, "grad")
    assert (grad[~masked] == 0).all(), "unmasked rows must get exactly zero gradient"
    return out, grad


# --------------------------------------------------------------------------------------------
# The reference against the GUIDELINES.md formulas
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_guidelines_pretrain(dtype):
    logits, targets, masked, p_mask = make_inputs(3, 9, 40, dtype=dtype, p_shape="BL")
    mine = loss_and_grad(lambda x: ref.masked_diffusion_loss(x, targets, masked, p_mask) / (3 * 9), logits)
    theirs = loss_and_grad(lambda x: ref.guidelines_pretrain_loss(x, targets, masked, p_mask.to(dtype)), logits)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.to(b.dtype), b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_guidelines_sft(dtype):
    B, L = 3, 9
    logits, targets, masked, p_mask = make_inputs(B, L, 40, dtype=dtype, p_shape="BL")
    prompt_lengths = torch.tensor([2, 0, 8])
    masked &= torch.arange(L) >= prompt_lengths[:, None]
    divisor = p_mask * (L - prompt_lengths)[:, None]
    mine = loss_and_grad(lambda x: ref.masked_diffusion_loss(x, targets, masked, divisor) / B, logits)
    theirs = loss_and_grad(
        lambda x: ref.guidelines_sft_loss(x, targets, masked, p_mask.to(dtype), prompt_lengths), logits)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.to(b.dtype), b)


# --------------------------------------------------------------------------------------------
# Every backend against the reference: logits form
# --------------------------------------------------------------------------------------------

SHAPES = [(2, 7, 77), (1, 1, 5), (1, 5, 1), (3, 4, 1000), (2, 3, 4099)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_logits_form(backend, dtype, shape):
    check_backend(backend, *make_inputs(*shape, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [0.0, 1.0], ids=["none_masked", "all_masked"])
@pytest.mark.parametrize("p_shape", ["B", "BL"])
def test_mask_extremes(backend, masked, p_shape):
    logits, targets, is_masked, p_mask = make_inputs(2, 6, 300, masked=masked, p_shape=p_shape)
    out, grad = check_backend(backend, logits, targets, is_masked, p_mask)
    if masked == 0.0:
        assert out.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_llada_vocabulary(backend):
    check_backend(backend, *make_inputs(1, 3, LLADA_V, masked=0.7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_large_magnitudes(backend):
    logits, targets, masked, p_mask = make_inputs(2, 5, 1500, dtype=torch.bfloat16, scale=1.0)
    logits = (logits.float() * 40 + 100).to(torch.bfloat16)  # around 100, spread over +-120
    check_backend(backend, logits, targets, masked, p_mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neg_inf_on_non_targets(backend, dtype):
    logits, targets, masked, p_mask = make_inputs(2, 6, 200, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    banned = torch.rand(logits.shape, generator=g) < 0.3
    banned.scatter_(-1, targets[..., None], False)
    logits = logits.masked_fill(banned, float("-inf"))
    _, grad = check_backend(backend, logits, targets, masked, p_mask)
    assert (grad[banned] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_mask_eps(backend):
    check_backend(backend, *make_inputs(2, 5, 300, masked=0.8, eps=1e-3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_none_and_strided_logits(backend):
    logits, targets, masked, p_mask = make_inputs(2, 6, 130, p_shape="BL")
    wide = torch.randn(2, 6, 260)[..., ::2]  # unit stride lost: the op copies
    wide.copy_(logits)
    out = check_backend(backend, wide, targets, masked, p_mask, reduction="none")[0]
    assert out.shape == (2, 6) and (out[~masked] == 0).all()


def test_float64_gradcheck_cpu():
    logits, targets, masked, p_mask = make_inputs(2, 3, 11, dtype=torch.float64, p_shape="BL")
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: masked_diffusion_loss(x, targets, masked, p_mask, backend="cpu", reduction="none"),
        (logits,))


@TRITON[0]
@TRITON[1]
def test_float64_gradcheck_triton():
    logits, targets, masked, p_mask = make_inputs(1, 3, 11, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: masked_diffusion_loss(x, targets, masked, p_mask, backend="triton"), (logits,))


# --------------------------------------------------------------------------------------------
# Fused-linear form
# --------------------------------------------------------------------------------------------

def fused_case(B, L, D, V, *, dtype=torch.float32, masked=0.5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D ** 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    _, targets, is_masked, p_mask = make_inputs(B, L, 1, masked=masked, seed=seed)
    targets = torch.randint(0, V, (B, L), generator=g)
    return hidden, weight, b, targets, is_masked, p_mask


def fused_grads(fn, hidden, weight, bias, *args, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w, b = leaves[0], leaves[1], (leaves[2] if bias is not None else None)
    loss = fn(h, w, *args, bias=b, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_form(backend, dtype, chunk_size, bias):
    hidden, weight, b, targets, masked, p_mask = fused_case(2, 5, 24, 133, dtype=dtype, bias=bias)
    out = fused_grads(fused_linear_masked_diffusion_loss, hidden, weight, b, targets, masked, p_mask,
                      chunk_size=chunk_size, backend=backend)
    eager = fused_grads(ref.fused_linear_masked_diffusion_loss, hidden, weight, b, targets, masked, p_mask)
    exact = fused_grads(ref.fused_linear_masked_diffusion_loss, hidden.double(), weight.double(),
                        None if b is None else b.double(), targets, masked, p_mask.double())
    for what, o, e, x in zip(["loss", "d hidden", "d weight", "d bias"], out, eager, exact):
        assert o.dtype == e.dtype
        assert_as_accurate(o, e, x, what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [0.0, 1.0], ids=["none_masked", "all_masked"])
def test_fused_mask_extremes(backend, masked):
    hidden, weight, b, targets, is_masked, p_mask = fused_case(1, 4, 8, 50, masked=masked)
    out = fused_grads(fused_linear_masked_diffusion_loss, hidden, weight, b, targets, is_masked, p_mask,
                      backend=backend)
    exact = fused_grads(ref.fused_linear_masked_diffusion_loss, hidden, weight, b, targets, is_masked, p_mask)
    for o, x in zip(out, exact):
        torch.testing.assert_close(o, x, rtol=1e-5, atol=1e-5)
    if masked == 0.0:
        assert all((o == 0).all() for o in out)


def test_fused_no_grad_keeps_nothing():
    hidden, weight, b, targets, masked, p_mask = fused_case(2, 3, 8, 20)
    with torch.no_grad():
        loss = fused_linear_masked_diffusion_loss(hidden.requires_grad_(), weight, targets, masked, p_mask,
                                                  bias=b, backend="cpu")
    torch.testing.assert_close(loss, ref.fused_linear_masked_diffusion_loss(hidden, weight, targets, masked,
                                                                            p_mask, bias=b).detach())


def test_fused_float64_gradcheck_cpu():
    hidden, weight, b, targets, masked, p_mask = fused_case(1, 4, 3, 7, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    assert torch.autograd.gradcheck(
        lambda h, w, bb: fused_linear_masked_diffusion_loss(h, w, targets, masked, p_mask, bias=bb,
                                                            chunk_size=2, backend="cpu"), leaves)


# --------------------------------------------------------------------------------------------
# Operator registration: opcheck and torch.compile
# --------------------------------------------------------------------------------------------

def test_opcheck_row_ops():
    logits, targets, masked, p_mask = make_inputs(2, 3, 37)
    rows = logits.reshape(6, 37).requires_grad_()
    weights = torch.where(masked, 1 / p_mask[:, None], 0).reshape(6)
    t = targets.reshape(6)
    torch.library.opcheck(torch.ops.llada.masked_diffusion_loss, (rows, t, weights))
    losses, lse = torch.ops.llada.masked_diffusion_loss(rows.detach(), t, weights)
    torch.library.opcheck(torch.ops.llada.masked_diffusion_loss_backward,
                          (torch.rand(6), rows.detach(), t, weights, lse))
    torch.library.opcheck(torch.ops.llada.masked_diffusion_loss_fwd_bwd, (rows.detach().clone(), t, weights))


def test_opcheck_fused_op():
    hidden, weight, b, targets, masked, p_mask = fused_case(2, 3, 8, 20)
    weights = torch.where(masked, 1 / p_mask[:, None], 0).reshape(6)
    args = (hidden.reshape(6, 8).requires_grad_(), weight.requires_grad_(), b.requires_grad_(),
            targets.reshape(6), weights, 2, "cpu", True)
    torch.library.opcheck(torch.ops.llada.fused_linear_masked_diffusion_loss, args)


def test_torch_compile_fullgraph():
    logits, targets, masked, p_mask = make_inputs(2, 5, 64)
    hidden, weight, b, _, _, _ = fused_case(2, 5, 8, 64)

    def both(logits, hidden, weight):
        return (training.llada_pretrain_loss(logits, targets, masked, p_mask, backend="cpu")
                + training.llada_pretrain_loss(hidden, targets, masked, p_mask, lm_head_weight=weight,
                                               backend="cpu"))

    compiled = torch.compile(both, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (logits, hidden, weight)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    leaves_eager = [t.clone().requires_grad_() for t in (logits, hidden, weight)]
    expect = both(*leaves_eager)
    torch.testing.assert_close(out, expect)
    for g, e in zip(grads, torch.autograd.grad(expect, leaves_eager)):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def _bad(**changes):
    logits, targets, masked, p_mask = make_inputs(2, 3, 10, masked=1.0)
    args = dict(logits=logits, targets=targets, masked=masked, p_mask=p_mask)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, exc, match", [
    (dict(targets=torch.full((2, 3), 10)), ValueError, r"targets holds 10, outside the vocabulary \[0, 10\)"),
    (dict(targets=torch.full((2, 3), -1)), ValueError, r"targets holds -1"),
    (dict(p_mask=torch.tensor([0.5, 0.0])), ValueError, r"p_mask must be finite and > 0 with a finite reciprocal in float32 .*; got 0.0 at \[1\]"),
    (dict(p_mask=torch.tensor([0.5, float("nan")])), ValueError, r"p_mask must be finite and > 0 with a finite reciprocal in float32 .*; got nan at \[1\]"),
    (dict(p_mask=torch.tensor([0.5, float("inf")])), ValueError, r"p_mask must be finite and > 0 with a finite reciprocal in float32 .*; got inf at \[1\]"),
    (dict(p_mask=torch.rand(3)), ValueError, r"p_mask must have shape \[2\]; got \[3\]"),
    (dict(targets=torch.zeros(2, 4, dtype=torch.long)), ValueError, r"targets must have shape \[2, 3\]"),
    (dict(targets=torch.zeros(2, 3, dtype=torch.int32)), TypeError, r"targets must have dtype int64"),
    (dict(masked=torch.ones(2, 3)), TypeError, r"masked must have dtype bool"),
    (dict(logits=torch.zeros(2, 3, 10, dtype=torch.int64)), TypeError, r"logits must have dtype"),
    (dict(logits=torch.zeros(6, 10)), ValueError, r"logits must have 3 dimensions"),
    (dict(p_mask=torch.rand(2, device="meta")), ValueError, r"p_mask is on meta but logits is on cpu"),
])
def test_bad_input(changes, exc, match):
    with pytest.raises(exc, match=match):
        masked_diffusion_loss(**_bad(**changes), backend="cpu")


def test_out_of_range_target_where_unmasked_is_fine():
    args = _bad(masked=torch.tensor([[True, False, True], [True, True, True]]))
    args["targets"][0, 1] = -100
    masked_diffusion_loss(**args, backend="cpu")


def test_bad_fused_input():
    hidden, weight, b, targets, masked, p_mask = fused_case(2, 3, 8, 20)
    with pytest.raises(ValueError, match=r"weight must have shape \['V', 8\]; got \[20, 9\]"):
        fused_linear_masked_diffusion_loss(hidden, torch.zeros(20, 9), targets, masked, p_mask)
    with pytest.raises(TypeError, match=r"weight must have dtype float32; got bfloat16"):
        fused_linear_masked_diffusion_loss(hidden, weight.bfloat16(), targets, masked, p_mask)
    with pytest.raises(ValueError, match=r"bias must have shape \[20\]"):
        fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask, bias=torch.zeros(21))
    with pytest.raises(ValueError, match=r"targets holds 20"):
        fused_linear_masked_diffusion_loss(hidden, weight, targets.masked_fill(masked, 20), masked.fill_(True),
                                           p_mask)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask, chunk_size=0)


# --------------------------------------------------------------------------------------------
# Convenience functions (llada_kernels.training)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("fused", [False, True])
def test_pretrain_and_sft_losses_match_guidelines(backend, fused):
    B, L, D, V = 3, 8, 12, 50
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, L), generator=g)
    hidden = torch.randn(B, L, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5
    prompt_lengths = torch.tensor([3, 0, 7])
    for prompts in (None, prompt_lengths):
        _, masked, p_mask = training.forward_process(ids, prompt_lengths=prompts, generator=g)
        logits = hidden @ weight.T
        if prompts is None:
            expect = ref.guidelines_pretrain_loss(logits, ids, masked, p_mask)
        else:
            expect = ref.guidelines_sft_loss(logits, ids, masked, p_mask, prompts)
        x, kw = (hidden, dict(lm_head_weight=weight)) if fused else (logits, {})
        if prompts is None:
            got = training.llada_pretrain_loss(x, ids, masked, p_mask, backend=backend, **kw)
        else:
            got = training.llada_sft_loss(x, ids, masked, p_mask, prompts, backend=backend, **kw)
        torch.testing.assert_close(got, expect)


def test_forward_process():
    B, L = 64, 50
    ids = torch.randint(0, 1000, (B, L))
    g = torch.Generator().manual_seed(0)
    noisy, masked, p_mask = training.forward_process(ids, generator=g)
    assert p_mask.shape == (B, L) and (p_mask >= 1e-3).all() and (p_mask <= 1).all()
    assert (p_mask == p_mask[:, :1]).all()
    assert ((noisy == training.MASK_ID) == masked).all() and (noisy[~masked] == ids[~masked]).all()
    # The masked fraction per row follows p_mask (binomial, 5 sigma over the whole batch).
    expected, n = p_mask[:, 0].sum() * L, B * L
    assert abs(masked.sum() - expected) < 5 * (n * 0.25) ** 0.5
    prompts = torch.randint(0, L, (B,))
    _, masked, _ = training.forward_process(ids, prompt_lengths=prompts, generator=g)
    assert not (masked & (torch.arange(L) < prompts[:, None])).any()


def test_mc_forward_process_counts():
    seq = torch.randint(0, 100, (16, 12))
    noisy, masked, ratio = training.mc_forward_process(seq, 4, generator=torch.Generator().manual_seed(3))
    counts = masked.sum(1)
    assert not masked[:, :4].any() and ((counts >= 1) & (counts <= 8)).all()
    torch.testing.assert_close(ratio, counts.float() / 8)
    # Stratified: the counts are spread evenly (consecutive samples differ by about T / b).
    assert counts.unique().numel() >= 6


@pytest.mark.parametrize("cfg_scale", [0.0, 2.0])
def test_get_log_likelihood_is_unbiased(cfg_scale):
    """A model whose logits ignore the input: every answer position's CE is fixed, and the
    estimator's expectation is exactly their sum."""
    V, Lp, T = 30, 3, 6
    table = torch.randn(Lp + T, V, generator=torch.Generator().manual_seed(0)) * 2
    prompt = torch.randint(0, V, (Lp,))
    answer = torch.randint(0, V, (T,))

    def model(ids):
        return table.expand(ids.shape[0], -1, -1)

    exact = -torch.nn.functional.cross_entropy(table[Lp:], answer, reduction="sum").item()
    est = training.get_log_likelihood(model, prompt, answer, mc_num=512, batch_size=32, cfg_scale=cfg_scale,
                                      generator=torch.Generator().manual_seed(1), backend="cpu")
    assert abs(est - exact) < 0.03 * abs(exact)



def test_fused_backward_twice_and_scaled():
    hidden, weight, b, targets, masked, p_mask = fused_case(1, 4, 8, 20, masked=1.0)
    hidden.requires_grad_()
    loss = fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask, backend="cpu")
    expect = torch.autograd.grad(ref.fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask),
                                 hidden)[0]
    for scale in (1.0, 3.0, 1.0):  # retain_graph: the saved gradients must not change
        (g,) = torch.autograd.grad(loss * scale, hidden, retain_graph=True)
        torch.testing.assert_close(g, expect * scale)
