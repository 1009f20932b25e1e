"""generate(): token-identical to LLaDA's generate() at temperature 0 (one prompt, a
left-padded batch, CFG, the EOS switches, several blocks), then the extensions: threshold
decoding, margin/entropy, stop at EOS, the prefix cache, and argument errors."""

import types

import pytest
import torch

from llada_kernels.generate import generate, num_transfer_schedule
from llada_kernels.model import LLaDAConfig, LLaDAModel
from llada_kernels.reference.llada_official import get_num_transfer_tokens, official_generate

V, MASK, EOS, EOT = 64, 63, 61, 62
BACKENDS = [None, "reference"]  # remask_step's default and the eager reference


@pytest.fixture(scope="module")
def model():
    """A tiny random model with large weights, so that its confidences are spread out and
    the top-k boundaries are free of near-ties."""
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=96,
                      vocab_size=V, embedding_size=V, max_sequence_length=64, rope_theta=10000.0,
                      mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS)
    m = LLaDAModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(10)
        # A trained LLaDA never predicts the mask token; a logit of 0 among 63 large ones
        # makes this one practically never do so either.
        m.model.transformer.ff_out.weight[MASK] = 0
    return m


class LogitsOnly(torch.nn.Module):
    """A model with only the released interface: .device and model(x, attention_mask).logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @property
    def device(self):
        return self.inner.device

    def forward(self, x, attention_mask=None):
        return self.inner(x, attention_mask=attention_mask)


def prompts(B=3, Lp=7, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 60, (B, Lp), generator=g)
    if not padded:
        return p, None
    am = torch.ones(B, Lp, dtype=torch.long)
    am[1, :2] = 0
    am[2, :4] = 0
    p[am == 0] = EOS  # LLaDA pads with EOS
    return p, am


CASES = {
    "one_prompt": dict(B=1, padded=False, kw=dict(steps=16, gen_length=16, block_length=16)),
    "padded_batch": dict(kw=dict(steps=16, gen_length=16, block_length=8)),
    "uneven_steps": dict(kw=dict(steps=6, gen_length=16, block_length=8)),  # k differs per step
    "cfg": dict(kw=dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.5)),
    "eos_switches": dict(kw=dict(steps=16, gen_length=16, block_length=4, logits_eos_inf=True,
                                 confidence_eos_eot_inf=True)),
    "confidence_eos_eot": dict(kw=dict(steps=16, gen_length=16, block_length=16,
                                       confidence_eos_eot_inf=True)),
}


def official_without_ties(model, B, padded, kw, monkeypatch):
    """The reference's output on the first prompt seed whose run never meets a tie at a top-k
    boundary. torch.topk breaks ties in no specified order and we break them by position (see
    generate's docstring), so only tie-free runs can be compared token for token. Ties do
    happen at confidence 0 with confidence_eos_eot_inf (several EOS/EoT candidates)."""
    topk, ties = torch.topk, []

    def recording_topk(c, k):
        s, k = c.sort(descending=True).values, int(k)
        ties.append(0 < k < len(s) and bool(s[k - 1] == s[k]))
        return topk(c, k)

    for seed in range(10):
        p, am = prompts(B=B, padded=padded, seed=seed)
        ties.clear()
        with monkeypatch.context() as mp:
            mp.setattr(torch, "topk", recording_topk)
            ref = official_generate(model, p, am, eos_id=EOS, eot_id=EOT, **kw)
        if not any(ties):
            return p, am, ref
    raise AssertionError("no tie-free prompt found")


@pytest.mark.parametrize("backend", BACKENDS, ids=["default", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_identical_tokens_to_llada_generate(model, case, backend, monkeypatch):
    c = CASES[case]
    kw = dict(mask_id=MASK, **c["kw"])
    p, am, ref = official_without_ties(model, c.get("B", 3), c.get("padded", True), kw, monkeypatch)
    out = generate(model, p, am, eos_id=EOS, eot_id=EOT, backend=backend, **kw)
    assert out.shape == (p.shape[0], p.shape[1] + kw["gen_length"])
    assert not (out == MASK).any()
    assert torch.equal(out, ref)


def test_identical_tokens_through_the_logits_only_path(model):
    p, am = prompts()
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK, cfg_scale=0.5)
    ref = official_generate(model, p, am, **kw)
    assert torch.equal(generate(LogitsOnly(model), p, am, **kw), ref)


class PredictsMaskFirst(torch.nn.Module):
    """A logits-only model (V = 8, mask id 7) that, while the second block is still all
    masks, chooses mask_id at position P with the highest confidence; afterwards it chooses
    token 3 there. Everywhere else it chooses token (position % 5) with less confidence,
    rising with the position (no ties, whose order the reference leaves unspecified)."""

    V, MASK, P = 8, 7, 5

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def forward(self, x, attention_mask=None):
        B, L = x.shape
        logits = torch.zeros(B, L, self.V)
        logits[:, torch.arange(L), torch.arange(L) % 5] = 1.0 + 0.1 * torch.arange(L)
        second_block_empty = (x[:, -4:] == self.MASK).all(1)                 # [B]
        logits[:, self.P] = 0.0
        logits[second_block_empty, self.P, self.MASK] = 9.0
        logits[~second_block_empty, self.P, 3] = 9.0
        return types.SimpleNamespace(logits=logits)


def test_positions_committed_as_mask_id_stay_candidates():
    """The reference can commit mask_id itself; the position stays masked and is a candidate
    in every later block. Its logits window must then reach back to it."""
    m = PredictsMaskFirst()
    p = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    kw = dict(steps=4, gen_length=8, block_length=4, mask_id=m.MASK)
    ref = official_generate(m, p, None, **kw)
    assert (ref[:, m.P] == 3).all()  # mask_id at the first block, token 3 at the second
    assert torch.equal(generate(m, p, None, **kw), ref)


def test_llada_generate_runs_on_our_model_and_prompt_masks_are_decoded(model):
    """A prompt holding mask tokens (infilling): the reference treats them as candidates of
    every block (and, since its per-block counts ignore them, can leave a generated position
    masked); the logits window then starts at the first of them, and the tokens agree."""
    p, am = prompts()
    p[:, 4] = MASK
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK)
    ref = official_generate(model, p, am, **kw)
    assert not (ref[:, 4] == MASK).any()
    assert torch.equal(generate(model, p, am, **kw), ref)


def test_cfg_without_attention_mask(model):
    """The reference raises NameError here; ours runs, and equals CFG with an all-ones mask."""
    p, _ = prompts(padded=False)
    kw = dict(steps=8, gen_length=8, block_length=8, mask_id=MASK, cfg_scale=1.0)
    with pytest.raises(NameError):
        official_generate(model, p, None, **kw)
    ones = torch.ones_like(p)
    assert torch.equal(generate(model, p, None, **kw), official_generate(model, p, ones, **kw))


def test_schedule_matches_get_num_transfer_tokens():
    g = torch.Generator().manual_seed(0)
    block = torch.rand(5, 13, generator=g) < 0.6
    for steps in (1, 3, 13, 20):
        assert torch.equal(num_transfer_schedule(block.sum(1), steps),
                           get_num_transfer_tokens(block, steps))


def test_sampling_is_reproducible_with_a_generator(model):
    p, am = prompts()
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK, temperature=1.0)
    a = generate(model, p, am, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, p, am, generator=torch.Generator().manual_seed(1), **kw)
    c = generate(model, p, am, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not (a == MASK).any()


@pytest.mark.parametrize("remasking", ["random", "margin", "entropy"])
def test_other_remasking_modes_fill_every_mask(model, remasking):
    p, am = prompts()
    out = generate(model, p, am, steps=8, gen_length=16, block_length=8, mask_id=MASK,
                   remasking=remasking, generator=torch.Generator().manual_seed(0))
    assert not (out == MASK).any()
    assert torch.equal(out[:, :7], p)
    assert not torch.equal(out, generate(model, p, am, steps=8, gen_length=16, block_length=8,
                                         mask_id=MASK))  # the order matters, so do the tokens


def test_threshold_decoding_counts_model_calls(model):
    p, am = prompts()
    kw = dict(steps=16, gen_length=16, block_length=8, mask_id=MASK, return_stats=True)
    # Nothing passes a threshold above 1: one token per row per call, block_length calls.
    out, stats = generate(model, p, am, threshold=1.5, **kw)
    assert stats.model_calls == 16 and stats.calls_per_block == [8, 8]
    assert not (out == MASK).any()
    # Everything passes: one call per block.
    out, stats = generate(model, p, am, threshold=-1.0, **kw)
    assert stats.calls_per_block == [1, 1]
    assert not (out == MASK).any()
    # In between: fewer calls than tokens, and the most confident token always commits.
    out, stats = generate(model, p, am, threshold=0.9, **kw)
    assert 2 <= stats.model_calls <= 16 and not (out == MASK).any()
    _, plain = generate(model, p, am, **kw)
    assert plain.model_calls == 16


def test_stop_at_eos_finishes_rows(model):
    p, am = prompts(B=4, seed=3)
    am = torch.cat([am, torch.ones(1, 7, dtype=torch.long)])[:4]
    kw = dict(steps=16, gen_length=16, block_length=4, mask_id=MASK)
    full = generate(model, p, am, **kw)
    out, stats = generate(model, p, am, eos_id=EOS, stop_at_eos=True, return_stats=True, **kw)
    Lp = p.shape[1]
    for b in range(4):
        eos = (full[b, Lp:] == EOS).nonzero()
        if len(eos) == 0:  # never finished: identical tokens
            assert torch.equal(out[b], full[b])
            continue
        end = Lp + (int(eos[0]) // 4 + 1) * 4  # the end of the block that produced it
        assert torch.equal(out[b, :end], full[b, :end])
        assert (out[b, end:] == EOS).all()
    assert stats.finished_rows_per_block == sorted(stats.finished_rows_per_block)
    if stats.finished_rows_per_block[-1] == 4:
        assert len(stats.calls_per_block) <= 4


def test_stop_at_eos_skips_finished_rows(model):
    """A row that has produced EOS costs nothing afterwards: force EOS everywhere by making it
    the only token the model wants."""
    p, am = prompts()
    biased = LLaDAModel(model.config).eval()
    biased.load_state_dict(model.state_dict())
    with torch.no_grad():
        biased.model.transformer.ff_out.weight[EOS] += 100 * biased.model.transformer.ln_f.weight.sign()
    out, stats = generate(biased, p, am, steps=16, gen_length=16, block_length=4, mask_id=MASK,
                          eos_id=EOS, stop_at_eos=True, return_stats=True)
    assert stats.calls_per_block == [4] and (out[:, 7 + 4:] == EOS).all()


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_last_layer_runs_on_the_window_only(model, cfg):
    """The sampler asks hidden_states for the logits window: the last block's queries and MLP
    see W rows per sequence (the first block every row), and the tokens are those of
    LLaDA's generate (test_identical_tokens_to_llada_generate checks the cases)."""
    p, am = prompts()
    first, last = model.model.transformer.blocks[0], model.model.transformer.blocks[-1]
    seen = []
    hooks = [m.register_forward_hook(lambda m, inp, out, name=name: seen.append((name, inp[0].shape[:-1])))
             for name, m in (("first", first.ff_proj), ("q", last.q_proj), ("mlp", last.ff_proj))]
    try:
        generate(model, p, am, steps=2, gen_length=16, block_length=8, mask_id=MASK, cfg_scale=cfg)
    finally:
        for h in hooks:
            h.remove()
    rows = 6 if cfg else 3
    assert seen == [("first", (rows, 23)), ("q", (rows, 8)), ("mlp", (rows, 8))] * 2


def test_output_is_an_ordinary_tensor(model):
    """generate runs under inference_mode but returns ordinary tensors: they can be changed in
    place and fed to a training step (inference tensors cannot be saved for backward)."""
    p, am = prompts()
    out, stats = generate(model, p, am, steps=2, gen_length=8, block_length=8, mask_id=MASK,
                          return_stats=True)
    assert not out.is_inference() and not torch.is_inference_mode_enabled()
    assert stats.model_calls == 2
    out[:, 0] = 0
    model.train()
    try:
        model(out).logits.square().mean().backward()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def test_prefix_cache(model):
    p, am = prompts()
    kw = dict(gen_length=16, block_length=8, mask_id=MASK)
    # One step per block: only the block's first (full) forward runs, so it is exact.
    exact = generate(model, p, am, steps=2, **kw)
    assert torch.equal(generate(model, p, am, steps=2, prefix_cache=True, **kw), exact)
    # More steps: approximate, but complete, and with CFG too.
    for cfg in (0.0, 1.0):
        out, stats = generate(model, p, am, steps=16, prefix_cache=True, cfg_scale=cfg,
                              return_stats=True, **kw)
        assert not (out == MASK).any() and stats.model_calls == 16
        assert torch.equal(out[:, :7], p)
    with pytest.raises(ValueError, match="prefix_cache is not supported for this model: LogitsOnly.forward takes no past_key_values"):
        generate(LogitsOnly(model), p, am, steps=2, prefix_cache=True, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=10, block_length=4), r"gen_length \(10\) must be a multiple of block_length \(4\)"),
    (dict(steps=3, gen_length=8, block_length=4), r"steps \(3\) must be a multiple of the number of blocks"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(remasking="top_p"), "remasking must be one of"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(gen_length=64, block_length=64, steps=64), r"exceeds the model's max_sequence_length \(64\)"),
    (dict(threshold=float("nan")), "threshold must be a finite float"),
])
def test_bad_arguments(model, kw, match):
    p, am = prompts()
    args = dict(steps=8, gen_length=8, block_length=8, mask_id=MASK)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(model, p, am, **args)


def test_bad_prompts_and_masks(model):
    p, am = prompts()
    kw = dict(steps=8, gen_length=8, block_length=8)
    with pytest.raises(TypeError, match=r"prompt must be a \[B, Lp\] int64 tensor"):
        generate(model, p[0], mask_id=MASK, **kw)
    with pytest.raises(ValueError, match="attention_mask must have the prompt's shape"):
        generate(model, p, am[:, 1:], mask_id=MASK, **kw)
    padded_with_mask = p.clone()
    padded_with_mask[am == 0] = MASK
    with pytest.raises(ValueError, match="padding uses mask_id"):
        generate(model, padded_with_mask, am, mask_id=MASK, **kw)
    with pytest.raises(ValueError, match="pad_token_id equals mask_id"):
        generate(model, p, am, mask_id=EOS, **kw)


def test_mask_and_eos_ids_come_from_the_model_config(model):
    """Without mask_id and eos_id, generate() takes the model's config.mask_token_id and
    eos_token_id (it used LLaDA-8B's 126336, outside this model's vocabulary)."""
    p, am = prompts()
    kw = dict(steps=8, gen_length=8, block_length=4, logits_eos_inf=True)
    out = generate(model, p, am, **kw)
    assert torch.equal(out, generate(model, p, am, mask_id=MASK, eos_id=EOS, **kw))
    assert not (out == MASK).any() and not (out[:, p.shape[1]:] == EOS).any()


def test_ids_outside_the_vocabulary_are_named(model):
    p, am = prompts()
    kw = dict(steps=8, gen_length=8, block_length=8)
    bad = p.clone()
    bad[2, 5] = V
    with pytest.raises(ValueError, match=r"generate: prompt holds 64, outside the vocabulary \[0, 64\)"):
        generate(model, bad, am, **kw)
    bad[2, 5] = -3
    with pytest.raises(ValueError, match=r"generate: prompt holds -3"):
        generate(model, bad, am, **kw)
    with pytest.raises(ValueError, match=r"generate: mask_id \(126336\) is outside the model's vocabulary \[0, 64\)"):
        generate(model, p, am, mask_id=126336, **kw)
    with pytest.raises(TypeError, match=r"generate: mask_id must be an int; got 63.0"):
        generate(model, p, am, mask_id=63.0, **kw)


def test_model_calls_skip_the_id_check(model, monkeypatch):
    """The sampler checks its ids once; the model's per-call value check (a host sync on an
    accelerator) does not run at every step."""
    import llada_kernels.model as model_module
    calls = []
    real = model_module.check_index
    monkeypatch.setattr(model_module, "check_index", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    p, am = prompts()
    generate(model, p, am, steps=8, gen_length=8, block_length=4)
    generate(model, p, am, steps=8, gen_length=8, block_length=4, prefix_cache=True, cfg_scale=1.0)
    assert calls == []
    model(p)
    assert calls == ["input_ids"]


def test_training_after_sampling():
    """A model whose first call is generate() (under inference_mode) trains afterwards: the
    RoPE tables it caches then are ordinary tensors (they were inference tensors, and the
    backward raised)."""
    torch.manual_seed(0)
    m = LLaDAModel(LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=32, vocab_size=20,
                               embedding_size=20, max_sequence_length=32, mask_token_id=19,
                               eos_token_id=18, pad_token_id=18))
    generate(m, torch.randint(0, 18, (2, 5)), steps=4, gen_length=4, block_length=4)
    m.train()
    m(torch.randint(0, 18, (2, 9))).logits.sum().backward()
    assert m.model.transformer.wte.weight.grad is not None
