"""Vocabulary-parallel masked_diffusion_loss and fused_linear_masked_diffusion_loss.

Two layers: the pieces (each shard's statistics from the single-device row kernel, and their
merge) in one process, with the shards simulated, on every backend including the CUDA kernels
on the host emulation; then the whole ops over real gloo process groups (tests/dist_pool.py:
2 ranks, and 3 for uneven shards held out of rank order), against the single-process op on the
gathered vocabulary, by the accuracy rule of tests/test_masked_diffusion_loss.py.
"""

import pytest
import torch
import torch.distributed as dist

import test_masked_diffusion_loss as single
from dist_pool import _session_pool, pool  # noqa: F401  (the fixtures)
from llada_kernels import fused_linear_masked_diffusion_loss, masked_diffusion_loss
from llada_kernels.distributed import loss as vp
from llada_kernels.distributed import vocab_range
from llada_kernels.reference import loss as ref

TRITON = pytest.param("triton", marks=single.TRITON)
PAIR = [(0, 19), (19, 37)]                  # V = 37 over ranks 0, 1
UNEVEN = [(20, 37), (0, 3), (3, 20)]        # V = 37 over ranks 0, 1, 2, not in rank order


# ---- the pieces, shards simulated in one process ------------------------------------------------

def simulate(backend, logits, targets, masked, p_mask, splits):
    """(ce [N], d ce.sum() / d logits [N, V]) from per-shard stats merged as the ranks do."""
    B, L, V = logits.shape
    rows = logits.reshape(B * L, V)
    t = targets.reshape(-1)
    w = torch.where(masked, 1 / ref.expand_p_mask(p_mask, B, L).float(), 0).reshape(-1)
    gathered = torch.stack([vp.shard_stats(rows[:, lo:hi].contiguous(), t - lo, w, backend)
                            for lo, hi in splits])
    stats, ce = vp.merge_stats(gathered, w)
    backward = ref.row_grad if backend == "reference" else torch.ops.llada.masked_diffusion_loss_backward
    if backend == "triton":
        backward = torch.ops.llada.masked_diffusion_loss_backward_triton
    grads = [backward(torch.ones_like(w), rows[:, lo:hi].contiguous(), t - lo, w, stats) for lo, hi in splits]
    return ce, torch.cat(grads, 1)


def single_process(logits, targets, masked, p_mask):
    x = logits.detach().clone().requires_grad_()
    ce = ref.masked_diffusion_loss(x, targets, masked, torch.ones_like(p_mask), reduction="none")
    (grad,) = torch.autograd.grad(ce.sum(), x)
    return ce.reshape(-1), grad.reshape(-1, logits.shape[-1])


@pytest.mark.parametrize("backend", ["reference", "cpu", TRITON])
@pytest.mark.parametrize("splits", [[(0, 37)], PAIR, sorted(UNEVEN), [(0, 1), (1, 36), (36, 37)]],
                         ids=["one", "pair", "uneven", "single_ids"])
def test_shard_stats_merge_to_the_whole_vocabulary(backend, splits):
    logits, targets, masked, p_mask = single.make_inputs(2, 5, 37, masked=0.7)
    ce, grad = simulate(backend, logits, targets, masked, p_mask, splits)
    want_ce, want_grad = single_process(logits, targets, masked, p_mask)
    exact_ce, exact_grad = single_process(logits.double(), targets, masked, p_mask.double())
    single.assert_as_accurate(ce, want_ce, exact_ce, "ce")
    single.assert_as_accurate(grad, want_grad, exact_grad, "grad")
    assert (grad[~masked.reshape(-1)] == 0).all()


def nonfinite_rows():
    """[1, 6, 12] logits, split [0, 5) + [5, 12), one row per case of the contract, across
    shards; targets in the second shard."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 6, 12, generator=g)
    inf = float("inf")
    logits[0, 0, 8] = float("nan")     # NaN in shard 1 only: NaN
    logits[0, 1, 2] = inf              # +inf in shard 0 only: NaN
    logits[0, 2, 5:] = -inf            # shard 1 all -inf, target there: +inf (finite max)
    logits[0, 3, :] = -inf             # every shard -inf: NaN
    logits[0, 4, :5] = -inf            # shard 0 all -inf: finite, shard 0's gradient 0
    targets = torch.tensor([[6, 6, 7, 6, 9, 10]])
    return logits, targets, torch.ones(1, 6, dtype=torch.bool), torch.ones(1)


def assert_same_nonfinite(got, want, what):
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN where {want.isnan()}, got {got}"
    assert torch.equal(got.isinf(), want.isinf()), f"{what}: inf where {want.isinf()}, got {got}"
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", TRITON])
def test_nonfinite_contract_across_shards(backend):
    logits, targets, masked, p_mask = nonfinite_rows()
    ce, grad = simulate(backend, logits, targets, masked, p_mask, [(0, 5), (5, 12)])
    want_ce, want_grad = single_process(logits, targets, masked, p_mask)
    assert want_ce.isnan().tolist() == [True, True, False, True, False, False]
    assert want_ce[2] == float("inf") and (grad[4, :5] == 0).all()
    assert_same_nonfinite(ce, want_ce, "ce")
    assert_same_nonfinite(grad, want_grad, "grad")


def test_cuda_kernels_on_the_host_emulation(emu_lib):
    """The same pieces with the CUDA row kernels (their stats: -inf for a shard of -inf)."""
    from cuda_emu import EmulatedCuda
    with EmulatedCuda() as emu:
        test_shard_stats_merge_to_the_whole_vocabulary("cpu", PAIR)
        test_nonfinite_contract_across_shards("cpu")
    assert emu.calls["masked_diffusion_loss"] == 4 and emu.calls["masked_diffusion_loss_backward"] == 4


@pytest.fixture
def emu_lib():
    from cuda_emu import library
    return library()


def test_a_merge_that_drops_a_shard_fails_the_check():
    """The checker above, on a planted bug: the merge sees only the first shard."""
    logits, targets, masked, p_mask = single.make_inputs(2, 5, 37, masked=0.7)
    real = vp.merge_stats
    try:
        vp.merge_stats = lambda gathered, w: real(gathered[:1], w)
        with pytest.raises(AssertionError):
            test_shard_stats_merge_to_the_whole_vocabulary("cpu", PAIR)
    finally:
        vp.merge_stats = real


# ---- the ops over gloo ---------------------------------------------------------------------------

def _group(ctx, splits):
    if len(splits) == 2:
        return ctx.pair
    return dist.group.WORLD


def weighting_of(p_mask, masked, weighting):
    """p_mask, or a token_weight of the same shape: 1 / p_mask with about a third zeroed (at
    least one masked position of weight 0, whose d token_weight is its CE)."""
    if weighting == "p_mask":
        return p_mask
    g = torch.Generator().manual_seed(5)
    w = p_mask.reciprocal() * (torch.rand(p_mask.shape, generator=g) > 0.35)
    zero = (w == 0) if w.dim() == 2 else (w == 0)[:, None]
    assert (zero & masked).any() and (~zero & masked).any()
    return w


def upstream(reduction, shape, dtype):
    """The upstream gradient: 1 for "sum", random (one 0) per position for "none"."""
    if reduction == "sum":
        return torch.ones((), dtype=dtype)
    up = torch.rand(shape, generator=torch.Generator().manual_seed(6)) + 0.5  # the same values
    up.view(-1)[1] = 0                                                         # in every dtype
    return up.to(dtype)


def check_logits_form(ctx, backend, dtype, splits, p_shape, reduction, weighting="p_mask"):
    """One rank's half of the test: its shard's loss and gradients against the single-process
    op (same backend) on the whole vocabulary. Returns the loss, to compare across ranks."""
    group = _group(ctx, splits)
    if group is None:
        return None
    lo, hi = splits[ctx.rank]
    logits, targets, masked, p_mask = single.make_inputs(2, 5, 37, dtype=dtype, masked=0.7, p_shape=p_shape)
    w = weighting_of(p_mask, masked, weighting)

    def run(x, **kw):
        x = x.detach().clone().requires_grad_()
        p = w.detach().clone().requires_grad_()
        out = masked_diffusion_loss(x, targets, masked, reduction=reduction, **{weighting: p}, **kw)
        up = upstream(reduction, out.shape, out.dtype)
        return [out.detach(), *torch.autograd.grad(out, (x, p), up)]

    got = run(logits[..., lo:hi], backend=backend, group=group, vocab_offset=lo)
    eager = run(logits, backend="reference")
    exact = run(logits.double(), backend="reference")
    eager[1], exact[1] = eager[1][..., lo:hi], exact[1][..., lo:hi]
    for what, g, e, x in zip(("loss", "d logits", f"d {weighting}"), got, eager, exact):
        assert g.dtype == e.dtype, what
        single.assert_as_accurate(g, e, x, what)
    assert (got[1][~masked] == 0).all()
    return got[0].tolist()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("splits", [PAIR, UNEVEN], ids=["2_ranks", "3_ranks_uneven"])
def test_logits_form(pool, backend, splits):
    results = pool.run(check_logits_form, backend, torch.float32, splits, "B", "sum")
    results = [r for r in results if r is not None]
    assert len(results) == len(splits) and all(r == results[0] for r in results)  # bitwise


@pytest.mark.parametrize("dtype, p_shape, reduction", [(torch.bfloat16, "BL", "none"),
                                                       (torch.float16, "B", "sum")], ids=str)
def test_logits_form_dtypes(pool, dtype, p_shape, reduction):
    pool.run(check_logits_form, "cpu", dtype, PAIR, p_shape, reduction)


@pytest.mark.parametrize("splits, p_shape, reduction", [(PAIR, "BL", "none"), (UNEVEN, "B", "sum"),
                                                        (UNEVEN, "BL", "sum")],
                         ids=["2_ranks_none", "3_ranks_uneven_B", "3_ranks_uneven_BL"])
def test_logits_form_token_weight(pool, splits, p_shape, reduction):
    """token_weight (zeros on some masked rows, which still get d token_weight = CE)."""
    results = [r for r in pool.run(check_logits_form, "cpu", torch.float32, splits, p_shape,
                                   reduction, "token_weight") if r is not None]
    assert all(r == results[0] for r in results)


@pytest.mark.triton
def test_logits_form_triton(pool):
    pool.run(check_logits_form, "triton", torch.float32, PAIR, "B", "sum")


def check_nonfinite(ctx):
    if ctx.pair is None:
        return
    logits, targets, masked, p_mask = nonfinite_rows()
    lo, hi = [(0, 5), (5, 12)][ctx.rank]
    x = logits[..., lo:hi].clone().requires_grad_()
    out = masked_diffusion_loss(x, targets, masked, p_mask, reduction="none", backend="cpu",
                                group=ctx.pair, vocab_offset=lo)
    (grad,) = torch.autograd.grad(out.sum(), x)
    want_ce, want_grad = single_process(logits, targets, masked, p_mask)
    assert_same_nonfinite(out.reshape(-1), want_ce, "loss")
    assert_same_nonfinite(grad.reshape(6, -1), want_grad[:, lo:hi], "grad")


def test_nonfinite_logits(pool):
    pool.run(check_nonfinite)


def check_fused(ctx, dtype, splits, chunk_size, bias, weighting="p_mask", reduction="sum",
                weight_grad=True):
    group = _group(ctx, splits)
    if group is None:
        return None
    lo, hi = splits[ctx.rank]
    hidden, weight, b, targets, masked, p_mask = single.fused_case(2, 5, 8, 37, dtype=dtype, bias=bias)
    if weighting == "token_weight":
        p_mask = p_mask[:, None].expand(2, 5).contiguous()  # zeros per position
    pw = weighting_of(p_mask, masked, weighting)

    def run(h, w, bb, p, **kw):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w) + ((bb,) if bias else ())]
        p = p.detach().clone().requires_grad_(weight_grad)
        out = fused_linear_masked_diffusion_loss(leaves[0], leaves[1], targets, masked,
                                                 bias=leaves[2] if bias else None,
                                                 reduction=reduction, **{weighting: p}, **kw)
        up = upstream(reduction, out.shape, out.dtype)
        grads = torch.autograd.grad(out, leaves + ([p] if weight_grad else []), up)
        return [out.detach(), *grads]

    shard_bias = b[lo:hi] if bias else None
    got = run(hidden, weight[lo:hi], shard_bias, pw, backend="cpu", chunk_size=chunk_size,
              group=group, vocab_offset=lo)
    eager = run(hidden, weight, b, pw, backend="reference")
    exact = run(hidden.double(), weight.double(), b.double() if bias else None, pw.double(),
                backend="reference")
    for r in (eager, exact):  # this rank's rows of d weight and d bias
        r[2] = r[2][lo:hi]
        if bias:
            r[3] = r[3][lo:hi]
    names = ["loss", "d hidden", "d weight"] + (["d bias"] if bias else []) + (
        [f"d {weighting}"] if weight_grad else [])
    assert len(got) == len(names)
    for what, g, e, x in zip(names, got, eager, exact):
        assert g.dtype == e.dtype, what
        single.assert_as_accurate(g, e, x, what)
    return got[0].tolist(), got[1].tolist()


@pytest.mark.parametrize("splits, chunk_size, bias", [(PAIR, None, True), (PAIR, 3, False),
                                                      (UNEVEN, 2, True)],
                         ids=["2_ranks", "2_ranks_chunks", "3_ranks_uneven_chunks"])
def test_fused_form(pool, splits, chunk_size, bias):
    results = [r for r in pool.run(check_fused, torch.float32, splits, chunk_size, bias) if r is not None]
    assert all(r == results[0] for r in results)  # the loss and d hidden, bitwise on every rank


FP32, BF16 = torch.float32, torch.bfloat16
FUSED_WEIGHTED = {  # id: (dtype, splits, chunk_size, bias, weighting, reduction, weight_grad)
    "token_weight_2_ranks": (FP32, PAIR, 3, False, "token_weight", "sum", True),
    "token_weight_no_grad_3_ranks_uneven": (FP32, UNEVEN, 2, True, "token_weight", "sum", False),
    "none_2_ranks": (FP32, PAIR, None, True, "p_mask", "none", True),
    "none_token_weight_3_ranks_uneven": (FP32, UNEVEN, 2, True, "token_weight", "none", True),
    "none_token_weight_bf16_2_ranks": (BF16, PAIR, 3, True, "token_weight", "none", True),
}


@pytest.mark.parametrize("case", list(FUSED_WEIGHTED))
def test_fused_form_token_weight_and_none(pool, case):
    """token_weight (its zero rows run only when it needs their gradient, as on one device) and
    reduction="none" (the backward from the kept statistics, with a random upstream gradient)."""
    results = pool.run(check_fused, *FUSED_WEIGHTED[case])
    results = [r for r in results if r is not None]
    assert all(r == results[0] for r in results)


def test_fused_form_bf16(pool):
    pool.run(check_fused, torch.bfloat16, PAIR, None, True)


def check_bad_input(ctx):
    if ctx.pair is None:
        return
    logits, targets, masked, p_mask = single.make_inputs(1, 4, 10, masked=1.0)
    lo, hi = [(0, 5), (5, 10)][ctx.rank]
    shard = logits[..., lo:hi]
    kw = dict(backend="cpu", group=ctx.pair)
    with pytest.raises(ValueError, match=r"tile the vocabulary.*rank 0 holds \[0, 5\), rank 1 holds \[6, 11\)"):
        masked_diffusion_loss(shard, targets, masked, p_mask, vocab_offset=lo + ctx.rank, **kw)
    with pytest.raises(ValueError, match=r"tile the vocabulary.*rank 1 holds \[0, 5\)"):
        masked_diffusion_loss(shard, targets, masked, p_mask, vocab_offset=0, **kw)
    bad = targets.clone()
    bad[0, 2] = 10
    with pytest.raises(ValueError, match=r"targets holds 10, outside the vocabulary \[0, 10\)"):
        masked_diffusion_loss(shard, bad, masked, p_mask, vocab_offset=lo, **kw)
    with pytest.raises(ValueError, match="same positions: logits has 4 rows on rank 0, 2 rows on rank 1"):
        n = 4 if ctx.rank == 0 else 2
        masked_diffusion_loss(shard[:, :n], targets[:, :n], masked[:, :n], p_mask, vocab_offset=lo, **kw)
    with pytest.raises(RuntimeError, match="double backward"):
        x = shard.clone().requires_grad_()
        out = masked_diffusion_loss(x, targets, masked, p_mask, vocab_offset=lo, **kw)
        torch.autograd.grad(out, x, create_graph=True)
    head = torch.randn(hi - lo, 3)
    mine = masked.clone()
    mine[0, 0] = ctx.rank == 0  # the ranks' masked differ: 4 rows on rank 0, 3 on rank 1
    with pytest.raises(ValueError, match="same masked and token_weight.*4 on rank 0, 3 on rank 1"):
        fused_linear_masked_diffusion_loss(torch.randn(1, 4, 3), head, targets, mine, p_mask,
                                           vocab_offset=lo, **kw)
    hidden = torch.randn(1, 4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        out = fused_linear_masked_diffusion_loss(hidden, head, targets, masked,
                                                 p_mask, reduction="none", vocab_offset=lo, **kw)
        torch.autograd.grad(out.sum(), hidden, create_graph=True)
    assert vocab_range(10, ctx.pair) == (lo, hi)


def test_bad_input(pool):
    pool.run(check_bad_input)


def test_arguments_checked_before_any_communication():
    logits, targets, masked, p_mask = single.make_inputs(1, 4, 10)
    with pytest.raises(ValueError, match="vocab_offset .3. needs group"):
        masked_diffusion_loss(logits, targets, masked, p_mask, vocab_offset=3)
    with pytest.raises(RuntimeError, match="not initialised"):
        masked_diffusion_loss(logits, targets, masked, p_mask, group=object())


def test_vocab_range_splits_evenly():
    ranges = [vocab_range(126464 + 2, rank=r, world_size=3) for r in range(3)]
    assert ranges == [(0, 42156), (42156, 84311), (84311, 126466)]
    with pytest.raises(ValueError, match="rank < W <= vocab_size"):
        vocab_range(2, rank=0, world_size=3)


def check_planted_merge_bug(ctx):
    """Rank-local merge (the other shard's statistics ignored): the check must fail."""
    if ctx.pair is None:
        return
    real = vp.merge_stats
    vp.merge_stats = lambda gathered, w: real(gathered[ctx.rank:ctx.rank + 1], w)
    try:
        with pytest.raises(AssertionError):
            check_logits_form(ctx, "cpu", torch.float32, PAIR, "B", "sum")
    finally:
        vp.merge_stats = real


def test_the_check_fails_on_a_planted_bug(pool):
    pool.run(check_planted_merge_bug)


def check_planted_per_token_bug(ctx):
    """reduction="none"'s backward without the all-reduce of d hidden: the check must fail."""
    if ctx.pair is None:
        return
    real = vp._all_reduce_rows
    vp._all_reduce_rows = lambda grad, rows, group, dtype: grad.to(dtype)
    try:
        with pytest.raises(AssertionError, match="d hidden"):
            check_fused(ctx, torch.float32, PAIR, None, True, "p_mask", "none")
    finally:
        vp._all_reduce_rows = real


def test_the_per_token_check_fails_on_a_planted_bug(pool):
    pool.run(check_planted_per_token_bug)
