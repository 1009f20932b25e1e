"""remask_step: the reference against LLaDA's official step, then every backend against the
reference, exact at temperature 0, statistically when sampling."""

import pytest
import torch

import llada_kernels
from llada_kernels import remask_step
from llada_kernels.reference import remask as ref

from conftest import KERNEL_BACKENDS
from llada_kernels.reference.llada_official import EOS_ID, EOT_ID, official_step

MASK = 7  # a small mask id so small vocabularies work; LLaDA's 126336 is tested separately
MODES = ["low_confidence", "margin", "entropy"]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def make_inputs(B, L, V, *, dtype=torch.float32, masked=0.7, seed=0, scale=3.0, mask_id=MASK):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    x = torch.randint(0, V, (B, L), generator=g)
    x[x == mask_id] = (mask_id + 1) % V if V > 1 else 0
    is_masked = torch.rand(B, L, generator=g) < masked
    x[is_masked] = mask_id
    return logits, x


def separated(logits, x, k, block_end, mode, *, mask_id=MASK, threshold=None, suppress_ids=(),
              zero_ids=(), uncond_logits=None, cfg_scale=0.0, rel=1e-4):
    """True when no two candidates' confidences (in fp64) are so close that fp32 rounding could
    reorder them across the selection boundary of any row (or across the threshold). Exact
    equality between implementations that round differently needs such inputs."""
    un = None if uncond_logits is None else uncond_logits.double()
    l64 = ref._fill_ids(ref.combined_logits(logits.double(), un, cfg_scale), suppress_ids)
    conf = ref.confidence(l64, l64.argmax(-1), mode, list(suppress_ids) + list(zero_ids)).double()
    cand = (x == mask_id) & (torch.arange(x.shape[1]) < block_end.unsqueeze(-1))
    for b in range(x.shape[0]):
        c = conf[b][cand[b]].sort(descending=True).values
        kb = int(k[b])
        if 0 < kb < c.numel() and (c[kb - 1] - c[kb]) / c[kb - 1].abs().clamp_min(1e-30) < rel:
            return False
        if threshold is not None and ((c - threshold).abs() / abs(threshold) < rel).any():
            return False
    return True


def tie_free(B, L, V, k, block_end, mode, *, dtype=torch.float32, masked=0.7, mask_id=MASK,
             cfg_scale=0.0, **kw):
    """make_inputs with the first seed whose selection boundaries are well separated.
    Returns logits, x and the CFG keyword arguments to pass on (empty without CFG)."""
    for seed in range(200):
        logits, x = make_inputs(B, L, V, dtype=dtype, masked=masked, seed=seed, mask_id=mask_id)
        cfg = {}
        if cfg_scale:
            un = make_inputs(B, L, V, dtype=dtype, seed=1000 + seed, mask_id=mask_id)[0]
            cfg = dict(uncond_logits=un, cfg_scale=cfg_scale)
        if separated(logits, x, k, block_end, mode, mask_id=mask_id, **cfg, **kw):
            return logits, x, cfg
    raise RuntimeError("no tie-free inputs found")


def rows(v, B):
    return torch.full((B,), v, dtype=torch.int64) if isinstance(v, int) else v


# --------------------------------------------------------------------------------------------
# The reference against the official LLaDA step
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_reference_matches_official_step(seed, cfg_scale):
    B, L, V, block_end = 3, 24, 50, 16
    logits, x = make_inputs(B, L, V, seed=seed)
    x[:, :4] = 1  # a prompt
    un = make_inputs(B, L, V, seed=seed + 99)[0] if cfg_scale else None
    cand = ((x == MASK) & (torch.arange(L) < block_end)).sum(1)
    k = torch.minimum(cand, torch.tensor([0, 3, 5]))  # the official step needs k <= candidates
    want = official_step(logits, x, k, mask_id=MASK, block_end=block_end, un_logits=un,
                         cfg_scale=cfg_scale)
    got = ref.remask_step(logits, x, k, mask_id=MASK, block_end=rows(block_end, B),
                          uncond_logits=un, cfg_scale=cfg_scale)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_reference_matches_official_eos_switches_and_sampling(temperature, remasking):
    """The same global-RNG draws give the same tokens at T > 0. LLaDA's two EOS switches map
    to suppress_ids=(EOS,) and zero_confidence_ids=(EOS, EoT) at T = 0, (EoT,) at T > 0."""
    B, L, V, block_end = 2, 16, EOT_ID + 5, 12
    logits, x = make_inputs(B, L, V, seed=5)
    x[x == MASK] = 1
    x[:, 4:] = MASK
    logits[:, :, EOT_ID] += 6  # make EoT the argmax often, so the switch matters
    k = torch.tensor([3, 8])
    zero_ids = (EOS_ID, EOT_ID) if temperature == 0 else (EOT_ID,)
    torch.manual_seed(123)
    want = official_step(logits, x, k, mask_id=MASK, block_end=block_end, temperature=temperature,
                         remasking=remasking, eos_id=EOS_ID, eot_id=EOT_ID, logits_eos_inf=True,
                         confidence_eos_eot_inf=True)
    torch.manual_seed(123)
    got = ref.remask_step(logits, x, k, mask_id=MASK, block_end=rows(block_end, B),
                          temperature=temperature, remasking=remasking, suppress_ids=(EOS_ID,),
                          zero_confidence_ids=zero_ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_reference_breaks_ties_by_position():
    logits = torch.zeros(1, 6, 4)  # every confidence is 1/4
    x = torch.full((1, 6), 3)
    x[0, 2] = 1
    x_new, transfer = ref.remask_step(logits, x, torch.tensor([2]), mask_id=3, block_end=rows(6, 1))
    assert transfer.tolist() == [[True, True, False, False, False, False]]
    assert x_new.tolist() == [[0, 0, 1, 3, 3, 3]]


# --------------------------------------------------------------------------------------------
# Every backend against the reference, exact at temperature 0
# --------------------------------------------------------------------------------------------

def check_against_reference(backend, logits, x, k, **kw):
    want = remask_step(logits, x, k, backend="reference", **kw)
    got = remask_step(logits, x, k, backend=backend, **kw)
    assert got[0].dtype == torch.int64 and got[1].dtype == torch.bool
    assert torch.equal(got[1], want[1]), f"transfer differs:\n{got[1].int()}\n{want[1].int()}"
    assert torch.equal(got[0], want[0]), f"x_new differs:\n{got[0]}\n{want[0]}"


SHAPES = [  # B, L, V
    (1, 1, 1),
    (1, 1, 37),
    (2, 9, 2),
    (3, 17, 1000),
    (2, 5, 4099),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backend_matches_reference(backend, dtype, mode, shape):
    B, L, V = shape
    k = torch.arange(B, dtype=torch.int64) * 2 + 1  # 1, 3, 5: some rows have fewer candidates
    end = torch.full((B,), L, dtype=torch.int64)
    mask_id = MASK if V > MASK else 0
    logits, x, _ = tie_free(B, L, V, k, end, mode, dtype=dtype, mask_id=mask_id)
    check_against_reference(backend, logits, x, k, mask_id=mask_id, remasking=mode)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", ["k=0", "k>candidates", "all masked", "none masked",
                                  "block_end int", "block_end rows", "threshold", "cfg",
                                  "suppress+zero_confidence", "strided", "llada ids"])
def test_backend_edge_cases(backend, case):
    B, L, V = 3, 12, 40
    k = torch.tensor([2, 0, 4])
    kw = dict(mask_id=MASK)
    masked = 0.6
    end = torch.full((B,), L)
    if case == "k=0":
        k = torch.zeros(B, dtype=torch.int64)
    elif case == "k>candidates":
        k = torch.tensor([L + 5, 100, 1])
    elif case == "all masked":
        masked = 1.0
    elif case == "none masked":
        masked = 0.0
    elif case == "block_end int":
        kw["block_end"] = 5
        end = torch.full((B,), 5)
    elif case == "block_end rows":
        end = torch.tensor([0, 7, 30])  # none, part, past the end
        kw["block_end"] = end
        k = torch.tensor([3, 2, 5])
    elif case == "threshold":
        kw["threshold"] = 0.25
        k = torch.tensor([1, 0, 2])
    elif case == "suppress+zero_confidence":
        kw.update(suppress_ids=[3, 11], zero_confidence_ids=[5, 0])
    elif case == "llada ids":  # the released vocabulary and special ids
        B, L, V = 1, 3, 126464
        k, end, masked = torch.tensor([2]), torch.full((1,), 3), 1.0
        kw = dict(mask_id=126336, suppress_ids=[EOS_ID], zero_confidence_ids=[EOS_ID, EOT_ID])
    logits, x, cfg = tie_free(B, L, V, k, end, "low_confidence", masked=masked,
                              mask_id=kw["mask_id"], threshold=kw.get("threshold"),
                              cfg_scale=2.0 if case == "cfg" else 0.0,
                              suppress_ids=kw.get("suppress_ids", ()),
                              zero_ids=kw.get("zero_confidence_ids", ()))
    kw.update(cfg)
    if case == "strided":
        logits = torch.cat([logits, logits], dim=1)[:, ::2]  # rows two apart in memory
        x = torch.stack([x, x], dim=-1)[..., 0]  # non-contiguous x
        assert not logits.is_contiguous() and not x.is_contiguous()
    check_against_reference(backend, logits, x, k, **kw)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rows_longer_than_one_selection_tile(backend):
    """L = 1100 > the Triton select kernel's 1024-position tile; k inside and beyond."""
    B, L, V = 2, 1100, 5
    k = torch.tensor([40, 500])
    logits, x, _ = tie_free(B, L, V, k, rows(L, B), "low_confidence", masked=0.1, mask_id=2)
    check_against_reference(backend, logits, x, k, mask_id=2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_k_larger_than_candidates_commits_every_candidate_and_nothing_else(backend):
    logits, x = make_inputs(2, 10, 30, seed=3)
    x_new, transfer = remask_step(logits, x, 1000, mask_id=MASK, block_end=6, backend=backend)
    cand = (x == MASK) & (torch.arange(10) < 6)
    assert torch.equal(transfer, cand)
    assert torch.equal(x_new[~cand], x[~cand])
    assert torch.equal(x_new[cand], logits.argmax(-1)[cand])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_rows_without_finite_confidence_logits_score_zero(backend):
    """Logits all -inf except suppressed ids: x0 is the first id, confidence 0, no NaN."""
    logits = torch.full((1, 4, 6), float("-inf"))
    logits[0, :, 2] = 1.0  # only id 2 is finite, and it is zero-confidence
    x = torch.full((1, 4), MASK % 6)
    x_new, transfer = remask_step(logits, x, 2, mask_id=MASK % 6, zero_confidence_ids=[2],
                                  backend=backend)
    assert transfer.tolist() == [[True, True, False, False]]
    assert x_new[0, :2].tolist() == [2, 2]


def test_cpu_handles_offsets_beyond_int32():
    """B*L*V > 2^31: the last row starts past 2^31 elements. 4.3 GB of bf16 logits."""
    V = 716_000_000
    logits = torch.zeros(1, 3, V, dtype=torch.bfloat16)
    logits[0, 2, V - 3] = 5.0
    x = torch.tensor([[1, 1, 0]])
    x_new, transfer = remask_step(logits, x, 1, mask_id=0, backend="cpu")
    assert x_new.tolist() == [[1, 1, V - 3]] and transfer.tolist() == [[False, False, True]]


# --------------------------------------------------------------------------------------------
# Sampling: temperature > 0 and random remasking
# --------------------------------------------------------------------------------------------

# Upper 1e-6 quantiles of chi-square with 7 and 15 degrees of freedom.
CHI2_CRIT = {7: 40.5, 15: 59.7}


def chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_sampling_frequencies_match_softmax(backend, temperature):
    """x0 ~ softmax(logits / T): chi-square over N = 1000 independent positions (the wrong
    temperature below then has a noncentrality of 100 to 160 against a critical value of 40)."""
    V, N = 8, 1000
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0])
    logits = row.expand(1, N, V).contiguous()
    x = torch.full((1, N), MASK)
    g = torch.Generator().manual_seed(17)
    x_new, _ = remask_step(logits, x, N, mask_id=MASK, temperature=temperature, generator=g,
                           backend=backend)
    counts = torch.bincount(x_new[0], minlength=V).double()
    p = torch.softmax(row.double() / temperature, 0)
    assert chi2(counts, p) < CHI2_CRIT[7]
    # The test has power: the same draws reject a neighbouring temperature.
    p_wrong = torch.softmax(row.double() / (temperature * 1.5), 0)
    assert chi2(counts, p_wrong) > CHI2_CRIT[7]


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_random_remasking_picks_uniformly(backend):
    """With "random", the committed positions of a row are a uniform k-subset."""
    L, k, trials = 16, 4, 150
    logits, x = make_inputs(1, L, 5, masked=1.0, seed=2, mask_id=MASK % 5)
    g = torch.Generator().manual_seed(5)
    hits = torch.zeros(L)
    for _ in range(trials):
        _, transfer = remask_step(logits, x, k, mask_id=MASK % 5, remasking="random",
                                  generator=g, backend=backend)
        assert int(transfer.sum()) == k
        hits += transfer[0].double()
    assert chi2(hits, torch.full((L,), 1.0 / L)) < CHI2_CRIT[15]


# --------------------------------------------------------------------------------------------
# The operator as PyTorch sees it
# --------------------------------------------------------------------------------------------

def op_args(B=2, L=6, V=20, seed=None):
    logits, x = make_inputs(B, L, V, seed=1)
    return (logits, None, 0.0, x, torch.tensor([2, 1]), torch.full((B,), L), MASK, 0.0,
            "low_confidence", None, [3], [4], seed)


@pytest.mark.parametrize("name", ["remask_step", pytest.param("remask_step_triton", marks=pytest.mark.triton)])
def test_opcheck(name):
    op = getattr(torch.ops.llada, name)
    torch.library.opcheck(op, op_args())
    seeded = list(op_args(seed=torch.tensor([42])))
    seeded[7] = 0.7  # temperature
    torch.library.opcheck(op, tuple(seeded))


def test_torch_compile_fullgraph():
    logits, x = make_inputs(2, 8, 30, seed=6)
    step = torch.compile(lambda l, x: remask_step(l, x, 3, mask_id=MASK, backend="cpu"),
                         fullgraph=True)
    got = step(logits, x)
    want = remask_step(logits, x, 3, mask_id=MASK, backend="reference")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(remasking="random"),
                                dict(temperature=0.7, remasking="random")],
                         ids=["temperature", "random", "both"])
def test_torch_compile_fullgraph_sampling(kw):
    """Issue 9 item 14: the seed is drawn with an out-of-place op (Tensor.random_ broke the
    graph). The draws come from the global RNG: the same torch.manual_seed gives the same step,
    and the step obeys the contract (k commits per row, x0 never a suppressed id)."""
    logits, x = make_inputs(2, 8, 30, masked=1.0, seed=6)
    step = torch.compile(lambda l, x: remask_step(l, x, 3, mask_id=MASK, suppress_ids=[1, 2],
                                                  backend="cpu", **kw), fullgraph=True)
    torch.manual_seed(11)
    x_new, transfer = step(logits, x)
    torch.manual_seed(11)
    again = step(logits, x)
    assert torch.equal(x_new, again[0]) and torch.equal(transfer, again[1])
    assert transfer.sum(1).tolist() == [3, 3]
    assert not ((x_new == 1) | (x_new == 2))[transfer].any()
    if "temperature" not in kw:  # random remasking alone: x0 is the argmax
        assert torch.equal(x_new[transfer], logits.argmax(-1)[transfer])


def test_torch_compile_with_a_generator_says_why():
    logits, x = make_inputs(1, 4, 10, seed=6)
    g = torch.Generator().manual_seed(0)
    step = torch.compile(lambda l, x: remask_step(l, x, 1, mask_id=MASK, temperature=1.0,
                                                  generator=g, backend="cpu"), fullgraph=True)
    with pytest.raises(Exception, match="generator must be None under torch.compile"):
        step(logits, x)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def bad(match, backend="cpu", **overrides):
    logits, x = make_inputs(2, 5, 10, seed=0)
    kw = dict(logits=logits, x=x, num_transfer=2, mask_id=MASK, backend=backend)
    kw.update(overrides)
    with pytest.raises((ValueError, TypeError, llada_kernels.BackendUnavailable), match=match):
        remask_step(kw.pop("logits"), kw.pop("x"), kw.pop("num_transfer"), **kw)


def test_bad_input_errors_name_the_argument():
    logits, x = make_inputs(2, 5, 10, seed=0)
    bad(r"logits must have dtype float32, bfloat16, float16; got int64", logits=x.unsqueeze(-1))
    bad(r"logits must have 3 dimensions; got 2", logits=logits[0])
    bad(r"x must have dtype int64; got int32", x=x.int())
    bad(r"x must have shape \[2, 5\]; got \[2, 4\]", x=x[:, :4])
    bad(r"x is on meta but logits is on cpu", x=x.to("meta"))
    bad(r"uncond_logits must have shape \[2, 5, 10\]; got \[2, 5, 9\]", uncond_logits=logits[..., :9])
    bad(r"mask_id must be in \[0, 9\]; got 10", mask_id=10)
    bad(r"suppress_ids holds 12, outside the vocabulary \[0, 10\)", suppress_ids=[1, 12])
    bad(r"zero_confidence_ids holds -1", zero_confidence_ids=[-1])
    bad(r"num_transfer must be in \[0, 2\^63 - 1\]; got -1", num_transfer=-1)
    bad(r"num_transfer must be >= 0; got -2", num_transfer=torch.tensor([1, -2]))
    bad(r"num_transfer must have shape \[2\]; got \[3\]", num_transfer=torch.tensor([1, 2, 3]))
    bad(r"block_end must have dtype int64, int32; got float32", block_end=torch.ones(2))
    bad(r"remasking must be one of .*; got 'lowest'", remasking="lowest")
    bad(r"temperature must be >= 0.0; got -1", temperature=-1.0)
    bad(r"threshold must be a real number; got nan", threshold=float("nan"))
    bad(r"backend='gpu' is not a backend", backend="gpu")
    bad(r"backend 'cuda' .* cannot run on cpu tensors", backend="cuda")
    bad(r"suppress_ids covers the whole vocabulary", suppress_ids=list(range(10)))


# Issue 9 items 7 and 8: every argument's type and range, checked before any backend runs, so
# every backend refuses the same calls with the same message.
ARGUMENT_CASES = [
    ("threshold must be a real number; got str '0.5'", dict(threshold="0.5")),
    ("threshold must be a real number; got Tensor", dict(threshold=torch.tensor(0.5))),
    ("threshold must be a real number; got bool", dict(threshold=True)),
    (r"num_transfer must be in \[0, 2\^63 - 1\]; got 9223372036854775808", dict(num_transfer=2**63)),
    ("num_transfer must be an int or a \\[B\\] int64 tensor; got float 2.0", dict(num_transfer=2.0)),
    (r"block_end must be in \[0, 2\^63 - 1\]; got 9223372036854775808", dict(block_end=2**63)),
    ("generator must be a torch.Generator or None; got int 123", dict(generator=123)),
    ("suppress_ids must be an iterable of ints; got int 3", dict(suppress_ids=3)),
    ("suppress_ids must be an iterable of ints; got str", dict(suppress_ids="3")),
    ("zero_confidence_ids must hold ints; got float 1.0", dict(zero_confidence_ids=[1.0])),
    ("suppress_ids must be an iterable of ints; got a int64 tensor of shape \\[2, 1\\]",
     dict(suppress_ids=torch.tensor([[1], [2]]))),
    ("temperature must be a real number; got str '1'", dict(temperature="1")),
    ("temperature must be a finite real number; got inf", dict(temperature=float("inf"))),
    ("temperature must be >= 0.0; got nan|temperature must be a finite real number; got nan",
     dict(temperature=float("nan"))),
    ("temperature must be finite in float32", dict(temperature=1e39)),
    ("cfg_scale must be a finite real number; got nan", dict(cfg_scale=float("nan"))),
    ("cfg_scale must be a finite real number; got inf", dict(cfg_scale=float("inf"))),
    ("cfg_scale must be a finite real number; got -inf", dict(cfg_scale=float("-inf"))),
    ("cfg_scale must be a real number; got NoneType", dict(cfg_scale=None)),
    ("mask_id must be an int; got bool", dict(mask_id=True)),
    ("mask_id must be an int; got float", dict(mask_id=7.0)),
    ("remasking must be one of .*; got None", dict(remasking=None)),
]


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("match, kw", ARGUMENT_CASES,
                         ids=[",".join(f"{k}={v!r}" for k, v in kw.items()) for _, kw in ARGUMENT_CASES])
def test_every_argument_is_checked_on_every_backend(backend, match, kw):
    bad(match, backend=backend, **kw)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_numpy_scalars_and_integer_tensors_are_accepted(backend):
    np = pytest.importorskip("numpy")
    logits, x = make_inputs(2, 5, 10, seed=0)
    want = remask_step(logits, x, 2, mask_id=MASK, threshold=0.5, suppress_ids=[3],
                       backend="reference")
    got = remask_step(logits, x, np.int64(2), mask_id=np.int32(MASK), threshold=np.float32(0.5),
                      suppress_ids=torch.tensor([3]), cfg_scale=np.float64(0.0), backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
