"""The contract for non-finite and extreme inputs (README, "Non-finite and extreme inputs"),
held against every backend that runs here, from one table per op.

Each table row is a hostile input with its expected result written out (x0) or computed by a
few lines of plain Python that state the contract (`contract_confidence`, `contract_loss`):
they do not call the library, so the reference backend is tested against them like any other.
A new backend joins by being listed in BACKENDS; a new remasking mode, by being listed in
MODES (with its confidence formula in contract_confidence). The CUDA kernels run here too, on
the host emulation (tests/cuda_emu.py, "cuda-emu"): CPU tensors, the CUDA C++ source.
"""

import contextlib
import math

import pytest
import torch

from llada_kernels import _backend, fused_linear_masked_diffusion_loss, masked_diffusion_loss, remask_step

from cuda_emu import EmulatedCuda

INF, NAN = math.inf, math.nan
# The Triton interpreter runs kernels in numpy, which warns on every inf - inf these inputs make.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
MODES = ["low_confidence", "margin", "entropy"]


def _backends():
    """(device, backend) pairs: every backend that must run here. Not filtered by whether it
    was built (a missing build fails, as in conftest); the Triton interpreter runs CPU tensors,
    the CUDA kernels run on CPU tensors through the host emulation, and on a GPU machine CUDA
    tensors go through reference, triton and cuda."""
    out = [pytest.param("cpu", "reference", id="reference"), pytest.param("cpu", "cpu", id="cpu"),
           pytest.param("cpu", "cuda-emu", id="cuda-emu")]
    if _backend.interpreting():
        out.append(pytest.param("cpu", "triton", id="triton", marks=pytest.mark.triton))
    if torch.cuda.is_available():
        out += [pytest.param("cuda", b, id=f"cuda-{b}") for b in ("reference", "triton", "cuda")]
    return out


BACKENDS = _backends()


def on(backend):
    """(the backend= to pass, the context to call it in): "cuda-emu" is backend="cpu" with
    llada's ops routed to the emulated CUDA kernels."""
    if backend == "cuda-emu":
        return "cpu", EmulatedCuda()
    return backend, contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# remask_step
# ---------------------------------------------------------------------------------------------

F = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 1.0, -2.0]  # a finite row, V = 8, argmax 2


def edit(row, **at):
    """row with row[i] = value for each i_<i>=value."""
    row = list(row)
    for key, value in at.items():
        row[int(key[1:])] = value
    return row


# name: (logits row, suppress_ids, zero_confidence_ids, x0 at every temperature or None when
#        it is sampled, uncond row and cfg_scale or None)
REMASK_TABLE = {
    "finite": (F, (), (), None, None),
    "nan": (edit(F, i5=NAN), (), (), 5, None),
    "two nans: the first": (edit(F, i3=NAN, i6=NAN), (), (), 3, None),
    "+inf": (edit(F, i4=INF), (), (), 4, None),
    "two +inf: the first": (edit(F, i1=INF, i6=INF), (), (), 1, None),
    "nan above +inf": (edit(F, i1=INF, i6=NAN), (), (), 6, None),
    "-inf at the argmax": (edit(F, i2=-INF), (), (), None, None),
    "-inf everywhere: id 0": ([-INF] * 8, (), (), 0, None),
    "-inf everywhere: the first id not suppressed": ([-INF] * 8, (0, 1), (), 2, None),
    "-inf but the suppressed ids": (edit([-INF] * 8, i0=1.0, i1=2.0), (0, 1), (), 2, None),
    "nan suppressed": (edit(F, i5=NAN), (5,), (), None, None),
    "+inf suppressed": (edit(F, i4=INF), (4,), (), None, None),
    "nan at a zero-confidence id": (edit(F, i5=NAN), (), (5,), 5, None),
    "+inf at a zero-confidence id": (edit(F, i4=INF), (), (4,), 4, None),
    "finite only at a zero-confidence id": (edit([-INF] * 8, i2=1.0), (), (2,), 2, None),
    "huge finite logits": (edit(F, i0=-3e38, i1=3e38, i2=1e38, i6=2.9e38), (), (), None, None),
    "equal huge logits": ([3e38] * 8, (), (), None, None),
    "cfg: nan in uncond": (F, (), (), 3, (edit(F, i3=NAN), 1.5)),
    "cfg: overflow to +inf": (edit(F, i6=3e38), (), (), 6, (edit(F, i6=-3e38), 1.0)),
    "cfg: inf - inf is nan": (edit(F, i1=INF, i7=INF), (), (), 1, (edit(F, i1=INF), 2.0)),
}


def contract_logits(row, uncond):
    """The fp32 logits the op reads: un + (s + 1) (cond - un) under guidance."""
    cond = torch.tensor(row, dtype=torch.float32)
    if uncond is None:
        return cond
    un, scale = torch.tensor(uncond[0], dtype=torch.float32), uncond[1]
    return un + torch.tensor(scale + 1.0, dtype=torch.float32) * (cond - un)


def contract_confidence(l, x0, mode, suppress, zero):
    """The confidence of x0, in float64, as the contract states it: the softmax formulas of the
    confidence logits z (l with suppress_ids and zero_confidence_ids at -inf); 0 where z holds
    a NaN or +inf or nothing finite."""
    z = [(-INF if v in suppress or v in zero else float(x)) for v, x in enumerate(l.tolist())]
    if any(math.isnan(x) or x == INF for x in z) or all(x == -INF for x in z):
        return 0.0
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    p = [x / s for x in e]
    if mode == "low_confidence":
        return p[x0]
    if mode == "margin":
        top = sorted(p, reverse=True) + [0.0]
        return top[0] - top[1]
    return sum(q * math.log(q) for q in p if q > 0)


def contract_x0_allowed(l, suppress):
    """What a sampled x0 may be: a finite logit that is not suppressed."""
    return [v for v, x in enumerate(l.tolist()) if v not in suppress and math.isfinite(x)]


def remask_call(device, backend, row, suppress, zero, uncond, *, threshold=None, k=0, **kw):
    logits = torch.tensor([[row]], dtype=torch.float32, device=device)
    cfg = {}
    if uncond is not None:
        cfg = dict(uncond_logits=torch.tensor([[uncond[0]]], dtype=torch.float32, device=device),
                   cfg_scale=uncond[1])
    x = torch.full((1, 1), 7, device=device)
    backend, context = on(backend)
    with context:
        return remask_step(logits, x, k, mask_id=7, suppress_ids=suppress, zero_confidence_ids=zero,
                           threshold=threshold, backend=backend, **cfg, **kw)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(REMASK_TABLE))
def test_remask_choice_and_confidence(device, backend, mode, case):
    """At T = 0: x0 as the table says (or the argmax of the finite logits), and a confidence
    within [c - tol, c + tol) of the contract's c, read through the threshold: with
    num_transfer = 0 a position is committed iff its confidence >= threshold."""
    row, suppress, zero, want_x0, uncond = REMASK_TABLE[case]
    l = contract_logits(row, uncond)
    if want_x0 is None:
        allowed = contract_x0_allowed(l, suppress)
        want_x0 = max(allowed, key=lambda v: (float(l[v]), -v))
    c = contract_confidence(l, want_x0, mode, suppress, zero)
    tol = max(abs(c) * 1e-5, 1e-30)
    x_new, transfer = remask_call(device, backend, row, suppress, zero, uncond, threshold=c - tol,
                                  remasking=mode)
    assert transfer.item(), f"confidence below the contract's {c}"
    assert x_new.item() == want_x0
    _, transfer = remask_call(device, backend, row, suppress, zero, uncond, threshold=c + tol,
                              remasking=mode)
    assert not transfer.item(), f"confidence above the contract's {c}"


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("case", list(REMASK_TABLE))
def test_remask_choice_when_sampling(device, backend, remasking, case):
    """At T > 0 (and with random remasking) x0 is the table's wherever it is set: noise never
    moves a NaN or +inf choice, never picks a -inf or suppressed id. Several seeds."""
    row, suppress, zero, want_x0, uncond = REMASK_TABLE[case]
    allowed = contract_x0_allowed(contract_logits(row, uncond), suppress)
    for seed in range(4):
        g = torch.Generator(device).manual_seed(seed)
        x_new, transfer = remask_call(device, backend, row, suppress, zero, uncond, k=1,
                                      temperature=1.0, remasking=remasking, generator=g)
        assert transfer.item()
        got = x_new.item()
        assert got == want_x0 if want_x0 is not None else got in allowed, (seed, got)


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("case", list(REMASK_TABLE))
def test_remask_editing(device, backend, case):
    """Token editing (edit_threshold) at a committed position reads the same x0 and confidence
    as a candidate: edited iff x0 differs from its token and the confidence c > threshold, so
    at c - tol it is, at c + tol it is not, and a row whose confidence is 0 (undefined) never
    is, even at threshold 0; a token equal to x0 never is."""
    row, suppress, zero, want_x0, uncond = REMASK_TABLE[case]
    l = contract_logits(row, uncond)
    if want_x0 is None:
        allowed = contract_x0_allowed(l, suppress)
        want_x0 = max(allowed, key=lambda v: (float(l[v]), -v))
    c = contract_confidence(l, want_x0, "low_confidence", suppress, zero)
    tol = max(c * 1e-5, 1e-30)
    other = next(v for v in (want_x0 + 1, want_x0 + 2, want_x0 + 3) if v % 8 != 7) % 8
    logits = torch.tensor([[row, row]], dtype=torch.float32, device=device)
    cfg = {}
    if uncond is not None:
        cfg = dict(uncond_logits=torch.tensor([[uncond[0]] * 2], dtype=torch.float32, device=device),
                   cfg_scale=uncond[1])
    x = torch.tensor([[other, want_x0]], device=device)  # x0 differs; x0 is the token
    name, context = on(backend)
    for t, edited in (((c - tol, True), (c + tol, False)) if c > 0 else ((0.0, False),)):
        with context:
            x_new, transfer = remask_step(logits, x, 0, mask_id=7, suppress_ids=suppress,
                                          zero_confidence_ids=zero, edit_threshold=t,
                                          backend=name, **cfg)
        assert transfer.tolist() == [[edited, False]], (t, c)
        assert x_new.tolist() == [[want_x0 if edited else other, want_x0]]


# Rows for the ordering test: the confidence of a non-finite row is 0, ranked with every other
# 0 by position, below every positive confidence, above every negative one (entropy).
ONE_HOT = [-INF] * 8
ONE_HOT[3] = 0.0
ORDER_ROWS = [F, edit(F, i5=NAN), edit(F, i4=INF), [-INF] * 8, ONE_HOT, edit(F, i2=4.0)]


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", range(1, 6))
def test_remask_non_finite_rows_rank_as_zero(device, backend, mode, k):
    logits = torch.tensor([ORDER_ROWS], dtype=torch.float32, device=device)
    L = len(ORDER_ROWS)
    conf = []
    for row in ORDER_ROWS:  # x0 matters only where the row is finite
        finite = [v for v, x in enumerate(row) if math.isfinite(x)] or [0]
        conf.append(contract_confidence(torch.tensor(row), max(finite, key=lambda v: row[v]), mode, (), ()))
    # The contract's order: higher confidence first, then lower position.
    order = sorted(range(L), key=lambda i: (-conf[i], i))
    x = torch.full((1, L), 7, device=device)
    backend, context = on(backend)
    with context:
        _, transfer = remask_step(logits, x, k, mask_id=7, remasking=mode, backend=backend)
    assert sorted(torch.nonzero(transfer[0]).flatten().tolist()) == sorted(order[:k]), conf


# ---------------------------------------------------------------------------------------------
# masked_diffusion_loss and its fused-linear form
# ---------------------------------------------------------------------------------------------

R = [0.3, -1.2, 2.0, 0.7, -0.4, 1.1]  # a finite row, V = 6

# name: (logits row, target)
LOSS_TABLE = {
    "finite": (R, 2),
    "nan at the target": (edit(R, i2=NAN), 2),
    "nan elsewhere": (edit(R, i4=NAN), 2),
    "+inf at the target": (edit(R, i2=INF), 2),
    "+inf elsewhere": (edit(R, i4=INF), 2),
    "+inf twice": (edit(R, i2=INF, i4=INF), 2),
    "-inf at the target": (edit(R, i2=-INF), 2),
    "-inf elsewhere": (edit(R, i0=-INF, i5=-INF), 2),
    "-inf everywhere": ([-INF] * 6, 2),
    "32 equal logits of 1e6": ([1e6] * 32, 5),
    "32 equal logits of 1e8": ([1e8] * 32, 5),
    "32 equal logits of -1e8": ([-1e8] * 32, 5),
    "equal logits of 3e38": ([3e38] * 6, 1),
    "large and close": ([1e8 + 8 * i for i in range(6)], 2),
    "huge range": ([3e38, -3e38, 0.0, 1.0, -1.0, 2e38], 5),
    "huge range, overflowing the loss": ([3e38, -3e38, 0.0, 1.0, -1.0, 2e38], 1),
}


def contract_loss(row, t, w):
    """w * CE and its gradient in the logits, in float64 from the logits as stored: NaN (and a
    NaN gradient row) when the row max is NaN, +inf or -inf; otherwise with the row max
    subtracted first, CE = log sum exp(x - m) + (m - x_t)."""
    if any(math.isnan(x) for x in row) or max(row) in (INF, -INF):
        return NAN, [NAN] * len(row)
    m = max(row)
    ls = math.log(sum(math.exp(x - m) for x in row))
    grad = [w * (math.exp(x - m - ls) - (j == t)) for j, x in enumerate(row)]
    return w * (ls + (m - row[t])), grad


def _close(got, want, rtol):
    got = torch.as_tensor(got, dtype=torch.float64).flatten()
    want = torch.tensor(want, dtype=torch.float64).flatten()
    want = want.to(torch.float32).double() if rtol < 1e-3 else want  # fp32 outputs: inf stays inf
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 1e-3, equal_nan=True)


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LOSS_TABLE))
def test_loss(device, backend, dtype, case):
    """Value and gradient of one masked row (weight 1 / p_mask = 2) beside an unmasked row that
    holds the same hostile values (never read: loss and gradient 0 there). The logits are cast
    to dtype first (fp16 turns 1e6 into +inf): the contract applies to the stored values."""
    row, t = LOSS_TABLE[case]
    logits = torch.tensor([[row, row]], dtype=torch.float32).to(dtype)
    stored = logits[0, 0].double().tolist()
    want_loss, want_grad = contract_loss(stored, t, 2.0)
    x = logits.to(device).requires_grad_()
    targets = torch.tensor([[t, t]], device=device)
    masked = torch.tensor([[True, False]], device=device)
    p_mask = torch.tensor([0.5], device=device)
    backend, context = on(backend)
    with context:
        loss = masked_diffusion_loss(x, targets, masked, p_mask, reduction="none", backend=backend)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    _close(loss[0, 0].item(), want_loss, 1e-5)
    _close(grad[0, 0].cpu(), want_grad, 1e-5 if dtype == torch.float32 else 1e-2)
    assert loss[0, 1].item() == 0.0 and (grad[0, 1] == 0).all()


FINITE_LOSS_CASES = [c for c, (row, _) in LOSS_TABLE.items()
                     if all(math.isfinite(x) for x in row) and "overflowing" not in c]


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("case", FINITE_LOSS_CASES)
def test_fused_loss_extremes(device, backend, case):
    """The fused form on the finite rows, through an identity lm_head: hidden @ I is exact."""
    row, t = LOSS_TABLE[case]
    V = len(row)
    hidden = torch.tensor([[row]], dtype=torch.float32, device=device).requires_grad_()
    weight = torch.eye(V, device=device)
    backend, context = on(backend)
    with context:
        loss = fused_linear_masked_diffusion_loss(
            hidden, weight, torch.tensor([[t]], device=device),
            torch.ones(1, 1, dtype=torch.bool, device=device), torch.tensor([0.5], device=device),
            backend=backend)
        (grad,) = torch.autograd.grad(loss, hidden)
    want_loss, want_grad = contract_loss(row, t, 2.0)
    _close(loss.item(), want_loss, 1e-5)
    _close(grad[0, 0].cpu(), want_grad, 1e-5)


# p_mask is checked as the kernels use it: in the accumulation dtype (float32 here, float64 for
# float64 logits), where it and its reciprocal must be finite and > 0 (issue 9 item 9).
P_MASK_TABLE = [
    ("1e-300 in float64, 0 in float32", torch.float32, torch.tensor([0.5, 1e-300], dtype=torch.float64),
     r"got 1e-300 at \[1\], which is 0.0 in float32"),
    ("1e300 in float64, inf in float32", torch.float32, torch.tensor([1e300, 0.5], dtype=torch.float64),
     r"got 1e\+300 at \[0\], which is inf in float32"),
    ("1e-39: a reciprocal that overflows float32", torch.float32, torch.tensor([0.5, 1e-39]),
     r"in float32 .*; got 1.00000\d*e-39 at \[1\]"),
    ("negative", torch.float32, torch.tensor([0.5, -0.25]), r"got -0.25 at \[1\]"),
    ("nan in [B, L]", torch.float32, torch.tensor([[0.5, 0.5, 0.5], [0.5, NAN, 0.5]]),
     r"got nan at \[1, 1\]"),
    ("1e-300 with float64 logits is fine", torch.float64, torch.tensor([0.5, 1e-300], dtype=torch.float64),
     None),
    ("1e-30 in float32 is fine", torch.float32, torch.tensor([0.5, 1e-30]), None),
]


@pytest.mark.parametrize("device, backend", BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("case, dtype, p_mask, match", P_MASK_TABLE, ids=[c[0] for c in P_MASK_TABLE])
def test_p_mask_is_checked_in_the_dtype_it_is_used_in(device, backend, fused, case, dtype, p_mask, match):
    backend, context = on(backend)
    with context:
        _p_mask_case(device, backend, fused, dtype, p_mask, match)


def _p_mask_case(device, backend, fused, dtype, p_mask, match):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=dtype).to(device)
    targets = torch.randint(0, 5, (2, 3), generator=g).to(device)
    masked = torch.ones(2, 3, dtype=torch.bool, device=device)
    p_mask = p_mask.to(device)
    if fused:
        call = lambda: fused_linear_masked_diffusion_loss(x, torch.eye(5, dtype=dtype, device=device), targets,
                                                          masked, p_mask, backend=backend)
    else:
        call = lambda: masked_diffusion_loss(x, targets, masked, p_mask, backend=backend)
    if match is None:
        loss = call()
        want = masked_diffusion_loss(x.double(), targets, masked, p_mask.double(), backend="reference")
        assert torch.isfinite(loss) and math.isclose(loss.item(), want.item(), rel_tol=1e-5)
        return
    with pytest.raises(ValueError, match="p_mask must be finite and > 0 with a finite reciprocal.*" + match):
        call()


def test_the_tables_can_fail():
    """The contract functions are not vacuous: they reject what the library did before
    issue 9 (Triton's +inf treated as finite, cpu's +inf loss, 1e8 ties losing log 32)."""
    l = contract_logits(edit(F, i4=INF), None)
    assert contract_confidence(l, 4, "low_confidence", (), ()) == 0.0
    assert math.isnan(contract_loss(edit(R, i4=INF), 2, 1.0)[0])
    assert contract_loss([1e8] * 32, 5, 1.0)[0] == pytest.approx(math.log(32))
    with pytest.raises(AssertionError):
        _close(3.4375, contract_loss([1e6] * 32, 5, 1.0)[0], 1e-5)  # the old fp32 answer
    with pytest.raises(AssertionError):
        _close(math.inf, contract_loss(edit(R, i4=INF), 2, 1.0)[0], 1e-5)  # the old cpu answer
