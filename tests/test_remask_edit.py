"""remask_step's token editing (LLaDA2.1; edit_threshold, editable): the reference against
diffusers' BlockRefinementScheduler rule, then every backend against the reference on fresh
random inputs (odd shapes, T = 0 exactly, T > 0 through the noise contract), the strict
comparison at exact boundaries, and the checks shown failing on planted bugs. The non-finite
cases are rows of tests/test_contract.py's table; the CUDA kernel runs these tests on the host
emulation in tests/test_cuda_host.py."""

import pytest
import torch

from llada_kernels import remask_step
from llada_kernels.reference import remask as ref

from conftest import KERNEL_BACKENDS
from test_remask_step import MASK, check_against_reference, make_inputs, separated

ALL_BACKENDS = ["reference"] + KERNEL_BACKENDS


def probabilities(logits, uncond=None, cfg_scale=0.0, suppress=()):
    """fp64 softmax of the guided logits with suppress_ids at -inf: [B, L, V]."""
    un = None if uncond is None else uncond.double()
    l64 = ref._fill_ids(ref.combined_logits(logits.double(), un, cfg_scale), suppress)
    return torch.softmax(l64, -1)


def clear_threshold(p, where, lo=0.05, hi=0.6, rel=1e-3):
    """A threshold in [lo, hi] at least `rel` (relative) from every probability p[where, v]
    (any v: at T > 0 any id may be x0), splitting them as evenly as it can; None if none is."""
    values = p[where].flatten()
    best = None
    for t in torch.linspace(lo, hi, 221).double().tolist():
        if ((values - t).abs() / t).min() < rel:
            continue
        balance = abs(float((values > t).double().mean()) - 0.5)
        if best is None or balance < best[0]:
            best = (balance, t)
    return None if best is None else best[1]


def edit_case(B, L, V, k, *, dtype=torch.float32, cfg_scale=0.0, suppress=(), zero=(),
              masked=0.35, with_editable=True, seed0=0):
    """Inputs for an editing step: logits, x (some committed tokens already the argmax, so
    never edited), editable, the keyword arguments, and a clear edit threshold; the first
    seed whose candidates' selection is tie-free and whose editable positions' confidences are
    clear of the threshold (exact equality across fp32 rounding needs both)."""
    end = torch.full((B,), L)
    for seed in range(seed0, seed0 + 200):
        logits, x = make_inputs(B, L, V, dtype=dtype, masked=masked, seed=seed)
        g = torch.Generator().manual_seed(seed + 500)
        uncond = make_inputs(B, L, V, dtype=dtype, seed=seed + 1000)[0] if cfg_scale else None
        p = probabilities(logits, uncond, cfg_scale, suppress)
        x0 = p.argmax(-1)
        keep = (x != MASK) & (x0 != MASK) & (torch.rand(B, L, generator=g) < 0.3)
        x = torch.where(keep, x0, x)
        editable = torch.rand(B, L, generator=g) < 0.7
        kw = dict(mask_id=MASK, suppress_ids=suppress, zero_confidence_ids=zero)
        if uncond is not None:
            kw.update(uncond_logits=uncond, cfg_scale=cfg_scale)
        if not separated(logits, x, k, end, "low_confidence", suppress_ids=suppress,
                         zero_ids=zero, uncond_logits=uncond, cfg_scale=cfg_scale):
            continue
        committed = (x != MASK) & (editable if with_editable else True)
        # The confidence of x0 (zero_confidence_ids out of the softmax) near the threshold?
        pz = probabilities(logits, uncond, cfg_scale, tuple(suppress) + tuple(zero))
        t = clear_threshold(pz, committed)
        if t is None:
            continue
        kw.update(edit_threshold=t, editable=editable if with_editable else None)
        return logits, x, kw
    raise RuntimeError("no clear inputs found")


def has_power(x, transfer, editable):
    """Some positions were edited and some editable committed ones were not."""
    committed = (x != MASK) & (True if editable is None else editable)
    edited = transfer & (x != MASK)
    assert edited.any() and (committed & ~edited).any() and not (edited & ~committed).any()


# --------------------------------------------------------------------------------------------
# The reference against diffusers' rule
# --------------------------------------------------------------------------------------------

def diffusers_edit_rule(logits, x, editable, editing_threshold):
    """BlockRefinementScheduler.step's editing_transfer_index at temperature 0 (diffusers
    0.39-0.42, mask mode), transcribed: sampled_tokens = argmax, sampled_probs =
    softmax(logits.float())[x0]; editable = ~(x == mask) & ~prompt_mask; edited =
    editable & (probs > editing_threshold) & (sampled_tokens != x)."""
    probs = torch.softmax(logits.float(), -1)
    tokens = logits.argmax(-1)
    conf = torch.gather(probs, -1, tokens[..., None])[..., 0]
    editable = (x != MASK) & editable
    edited = torch.where(editable, conf, -torch.inf) > float(editing_threshold)
    return edited & (tokens != x) & editable


@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_the_diffusers_rule(seed):
    B, L, V = 3, 11, 40
    k = torch.tensor([1, 2, 0])
    logits, x, kw = edit_case(B, L, V, k, seed0=seed * 50)
    x_new, transfer = ref.remask_step(logits, x, k, block_end=torch.full((B,), L), **kw)
    want = diffusers_edit_rule(logits, x, kw["editable"], kw["edit_threshold"])
    assert torch.equal(transfer & (x != MASK), want)
    assert torch.equal(x_new[want], logits.argmax(-1)[want])
    # The candidates' selection is the step without editing.
    plain = {key: v for key, v in kw.items() if key not in ("edit_threshold", "editable")}
    x_plain, t_plain = ref.remask_step(logits, x, k, block_end=torch.full((B,), L), **plain)
    assert torch.equal(transfer & (x == MASK), t_plain)
    assert torch.equal(torch.where(want, x, x_new), x_plain)
    has_power(x, transfer, kw["editable"])


def test_reference_matches_the_diffusers_scheduler():
    """The installed diffusers' own BlockRefinementScheduler.step, where it is installed."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (a test dependency) is not installed")
    B, L, V = 2, 8, 40
    logits, x, kw = edit_case(B, L, V, torch.tensor([0, 0]), masked=0.0)
    prompt = torch.arange(L) < 2
    sched = diffusers.BlockRefinementScheduler()
    sched.set_timesteps(L)
    out = sched.step(logits, 0, x, mask_token_id=MASK, temperature=0.0, threshold=2.0,
                     editing_threshold=kw["edit_threshold"], prompt_mask=prompt)
    got = remask_step(logits, x, 0, mask_id=MASK, edit_threshold=kw["edit_threshold"],
                      editable=(~prompt).expand(B, L), backend="reference")
    assert torch.equal(got[1], out.editing_transfer_index) and torch.equal(got[0], out.prev_sample)
    assert got[1].any()


# --------------------------------------------------------------------------------------------
# Every backend against the reference
# --------------------------------------------------------------------------------------------

EDIT_CASES = {  # name: (B, L, V, edit_case keyword arguments)
    "1x1": (1, 3, 37, {}),
    "odd 3x7 V=37": (3, 7, 37, {}),
    "editable=None": (3, 7, 37, dict(with_editable=False)),
    "bf16 V=4099": (3, 5, 4099, dict(dtype=torch.bfloat16)),
    "fp16 cfg": (3, 7, 300, dict(dtype=torch.float16, cfg_scale=1.5)),
    "suppress+zero_confidence": (3, 9, 37, dict(suppress=(3, 11), zero=(5, 0))),
    "all committed": (1, 9, 37, dict(masked=0.0)),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(EDIT_CASES))
def test_backend_edits_as_the_reference(backend, case):
    B, L, V, opts = EDIT_CASES[case]
    k = torch.tensor([2, 0, 5])[:B]
    logits, x, kw = edit_case(B, L, V, k, **opts)
    check_against_reference(backend, logits, x, k, **kw)
    if B * L > 3:
        has_power(x, remask_step(logits, x, k, backend="reference", **kw)[1], kw["editable"])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_threshold_block_end_and_strided_inputs(backend):
    """Editing with a candidate threshold, a block end (editing is not limited by it), and
    strided x and editable."""
    B, L, V = 3, 9, 37
    k = torch.tensor([1, 0, 2])
    logits, x, kw = edit_case(B, L, V, k)
    kw.update(threshold=0.9, block_end=torch.tensor([4, 9, 0]))
    kw["editable"] = torch.stack([kw["editable"], ~kw["editable"]], -1)[..., 0]
    x = torch.stack([x, x], -1)[..., 0]
    assert not x.is_contiguous() and not kw["editable"].is_contiguous()
    check_against_reference(backend, logits, x, k, **kw)
    transfer = remask_step(logits, x, k, backend="reference", **kw)[1]
    assert (transfer & (x != MASK) & (torch.arange(L) >= kw["block_end"][:, None])).any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("temperature", [0.6, 2.0])
def test_sampling_edits_with_the_positions_own_noise(backend, temperature):
    """At T > 0 an editable position's x0 is the one the same step draws for it as a candidate
    (the noise is keyed by position, and the reference draws noise for every position), and
    it is edited iff that x0 differs with (fp64) confidence above the threshold."""
    B, L, V = 3, 7, 37
    logits, x = make_inputs(B, L, V, masked=0.3, seed=8, scale=1.0)  # flat: the noise decides
    editable = torch.rand(B, L, generator=torch.Generator().manual_seed(1)) < 0.7
    committed = (x != MASK) & editable
    p = probabilities(logits)
    t = clear_threshold(p, committed, lo=0.03, hi=0.3)
    g = torch.Generator().manual_seed(3)
    x_new, transfer = remask_step(logits, x, 2, mask_id=MASK, temperature=temperature, generator=g,
                                  edit_threshold=t, editable=editable, backend=backend)
    g = torch.Generator().manual_seed(3)  # the same draws, every scored position a candidate
    x0 = remask_step(logits, torch.where(committed | (x == MASK), MASK, x), L, mask_id=MASK,
                     temperature=temperature, generator=g, backend=backend)[0]
    conf = p.gather(-1, x0[..., None])[..., 0]
    want = committed & (x0 != x) & (conf > t)
    assert torch.equal(transfer & (x != MASK), want)
    assert torch.equal(x_new[transfer], x0[transfer])  # candidates too: the same noise
    assert want.any() and (committed & ~want).any() and (x0 != logits.argmax(-1))[want].any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_the_edit_threshold_is_strict(backend):
    """Confidences that are exact in fp32 on every backend (two tied ids: 1/2; one finite id:
    1; four tied: 1/4): a threshold equal to one never edits, the fp32 just below it does."""
    V, mask = 8, 7
    ninf = float("-inf")
    rows = [[0.0, 0.0] + [ninf] * 6, [ninf] * 3 + [2.0] + [ninf] * 4, [1.0] * 4 + [ninf] * 4]
    logits = torch.tensor([rows])
    x = torch.tensor([[5, 0, 6]])  # x0 = 0, 3, 0: every token differs from its x0
    for t, conf_at in ((0.5, 0), (1.0, 1), (0.25, 2)):
        below = torch.nextafter(torch.tensor(t), torch.tensor(0.0)).item()
        for thr, edited in ((t, False), (below, True)):
            x_new, transfer = remask_step(logits, x, 0, mask_id=mask, edit_threshold=thr,
                                          backend=backend)
            assert transfer[0, conf_at].item() == edited, (t, thr)
            assert x_new[0, conf_at].item() == ([0, 3, 0][conf_at] if edited else x[0, conf_at].item())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_positions_and_unchanged_tokens_are_never_edited(backend):
    """editable holding masked positions: they are candidates (k = 0 commits none); x == x0:
    not edited whatever the threshold; edit_threshold 0 edits every other position."""
    logits, x = make_inputs(2, 6, 20, masked=0.5, seed=2)
    x0 = logits.argmax(-1)
    x = torch.where(torch.arange(6) % 3 == 0, torch.where(x == MASK, x, x0), x)
    x_new, transfer = remask_step(logits, x, 0, mask_id=MASK, edit_threshold=0.0,
                                  editable=torch.ones(2, 6, dtype=torch.bool), backend=backend)
    assert torch.equal(transfer, (x != MASK) & (x0 != x))
    assert torch.equal(x_new, torch.where(transfer, x0, x))


# --------------------------------------------------------------------------------------------
# The checks on planted bugs
# --------------------------------------------------------------------------------------------

def _at_least(x0, conf, x, mask_id, t, editable=None):
    """A wrong comparison direction: >= instead of >."""
    t = torch.tensor(t, dtype=torch.float32).item()
    edited = (x != mask_id) & (x0 != x) & (conf >= t)
    return edited if editable is None else edited & editable


def _shifted_editable(x0, conf, x, mask_id, t, editable=None):
    """An off-by-one on the editable mask: position l reads editable[l - 1]."""
    shifted = None if editable is None else torch.roll(editable, 1, -1)
    return _REAL_EDITS(x0, conf, x, mask_id, t, shifted)


def _ignores_editable(x0, conf, x, mask_id, t, editable=None):
    return _REAL_EDITS(x0, conf, x, mask_id, t, None)


_REAL_EDITS = ref.edits


@pytest.mark.parametrize("planted, check", [
    (_at_least, lambda: test_the_edit_threshold_is_strict("reference")),
    (_shifted_editable, lambda: test_backend_edits_as_the_reference("cpu", "odd 3x7 V=37")),
    (_ignores_editable, lambda: test_backend_edits_as_the_reference("cpu", "bf16 V=4099")),
], ids=["'>=' for '>'", "editable off by one", "editable ignored"])
def test_the_checks_fail_on_planted_bugs(monkeypatch, planted, check):
    """The reference with a planted bug in its edit rule (the truth the kernels are held to)
    fails the tests above: the inputs exercise the comparison and the mask."""
    monkeypatch.setattr(ref, "edits", planted)
    with pytest.raises(AssertionError):
        check()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("match, kw", [
    (r"edit_threshold must be >= 0.0; got -0.1", dict(edit_threshold=-0.1)),
    (r"edit_threshold must be a real number; got nan", dict(edit_threshold=float("nan"))),
    (r"edit_threshold must be a real number; got str", dict(edit_threshold="0.5")),
    (r"edit_threshold needs remasking='low_confidence'.*got remasking='margin'",
     dict(edit_threshold=0.5, remasking="margin")),
    (r"editable needs edit_threshold", dict(editable=torch.ones(2, 5, dtype=torch.bool))),
    (r"editable must have dtype bool; got int64",
     dict(edit_threshold=0.5, editable=torch.ones(2, 5, dtype=torch.long))),
    (r"editable must have shape \[2, 5\]; got \[2, 4\]",
     dict(edit_threshold=0.5, editable=torch.ones(2, 4, dtype=torch.bool))),
    (r"editable must have 2 dimensions; got 1",
     dict(edit_threshold=0.5, editable=torch.ones(5, dtype=torch.bool))),
    (r"editable is on meta but logits is on cpu",
     dict(edit_threshold=0.5, editable=torch.ones(2, 5, dtype=torch.bool, device="meta"))),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_editing_arguments_name_the_argument(backend, match, kw):
    logits, x = make_inputs(2, 5, 10, seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        remask_step(logits, x, 1, mask_id=MASK, backend=backend, **kw)


@pytest.mark.parametrize("name", ["remask_step",
                                  pytest.param("remask_step_triton", marks=pytest.mark.triton)])
def test_opcheck_with_editing(name):
    logits, x = make_inputs(2, 6, 20, seed=1)
    editable = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    args = (logits, None, 0.0, x, torch.tensor([2, 1]), torch.full((2,), 6), MASK, 0.7,
            "low_confidence", None, [3], [4], torch.tensor([42]))
    op = getattr(torch.ops.llada, name)
    torch.library.opcheck(op, args, dict(edit_threshold=0.2, editable=editable))
    torch.library.opcheck(op, args, dict(edit_threshold=0.2))


def test_torch_compile_fullgraph_with_editing():
    logits, x = make_inputs(2, 8, 30, seed=6)
    editable = torch.rand(2, 8, generator=torch.Generator().manual_seed(0)) < 0.6
    step = torch.compile(lambda l, x, e: remask_step(l, x, 3, mask_id=MASK, edit_threshold=0.2,
                                                     editable=e, backend="cpu"), fullgraph=True)
    got = step(logits, x, editable)
    want = remask_step(logits, x, 3, mask_id=MASK, edit_threshold=0.2, editable=editable,
                       backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (want[1] & (x != MASK)).any()


@pytest.mark.parametrize("name", ["remask_step",
                                  pytest.param("remask_step_triton", marks=pytest.mark.triton)])
def test_the_kernels_refuse_editing_with_another_mode(name):
    """Direct calls of the operator (the public op checks this first, by name)."""
    logits, x = make_inputs(2, 6, 20, seed=1)
    args = (logits, None, 0.0, x, torch.tensor([2, 1]), torch.full((2,), 6), MASK, 0.0,
            "margin", None, [], [], None)
    with pytest.raises((RuntimeError, ValueError), match="edit_threshold needs remasking='low_confidence'"):
        getattr(torch.ops.llada, name)(*args, edit_threshold=0.2)
