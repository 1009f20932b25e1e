"""block_generate(): the exact KV cache gives the tokens of recomputing the whole block-causal
forward at every step (a batch of prompts of different lengths, top-k, threshold, editing,
stop at EOS, temperature with a generator, sampler blocks of two attention blocks); a cache
written from a block's last denoising step, planted, is caught; LLaDA2's step rule against a
transcription; argument errors. Parity with diffusers' LLaDA2Pipeline:
tests/test_block_generate_diffusers.py."""

import pytest
import torch

from llada_kernels import block_generate as bg
from llada_kernels.block_generate import block_generate, transfer_schedule
from llada_kernels.model import LLaDAConfig, LLaDAModel

V, MASK, EOS, PAD = 64, 63, 61, 60


def block_model(block_size=4, seed=0, scale=10.0):
    """A tiny random block-diffusion model with large weights: its confidences are spread
    out (top-k boundaries free of near-ties; at scale 10 they lie between about 0.08 and
    0.25, so the thresholds of the cases below are 0.12-0.15), and it never predicts MASK."""
    torch.manual_seed(seed)
    cfg = LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=96,
                      vocab_size=V, embedding_size=V, max_sequence_length=128,
                      rope_theta=10000.0, mask_token_id=MASK, eos_token_id=EOS,
                      pad_token_id=PAD, block_size=block_size)
    m = LLaDAModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(scale)
        m.model.transformer.ff_out.weight[MASK] = 0
    return m


@pytest.fixture(scope="module")
def model():
    return block_model()


def batch(B=3, Lp=10, seed=0):
    """Left-padded prompts of lengths Lp, Lp - 3, Lp - 6."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 58, (B, Lp), generator=g)
    am = torch.ones(B, Lp, dtype=torch.long)
    for b in range(1, B):
        am[b, :3 * b] = 0
    p[am == 0] = PAD
    return p, am


CASES = {
    "top-k": dict(threshold=None),
    "threshold": dict(threshold=0.12),
    "few-steps": dict(threshold=None, steps=3),
    "editing": dict(threshold=0.12, editing_threshold=0.3),
    "eos": dict(threshold=0.15, stop_at_eos=True),
    "sampler-block-8": dict(threshold=0.12, block_length=8),
}


@pytest.mark.parametrize("case", CASES)
def test_cache_gives_the_tokens_of_the_full_recompute(model, case):
    prompt, am = batch()
    kw = CASES[case]
    x, st = block_generate(model, prompt, am, gen_length=13, return_stats=True, **kw)
    ref, st_ref = block_generate(model, prompt, am, gen_length=13, cache=None,
                                 return_stats=True, **kw)
    assert torch.equal(x, ref)
    assert st.calls_per_block == st_ref.calls_per_block          # no extra call per block
    assert torch.equal(x[:, :10], prompt)
    assert not (x[:, 10:] == MASK).any()
    assert len(st.calls_per_block) >= 2 and max(st.calls_per_block) > 1


def test_the_cases_exercise_threshold_and_editing(model):
    """The threshold commits more than the schedule (fewer calls, other tokens than top-k);
    editing changes committed tokens (more calls, other tokens): a case that changed nothing
    would make the comparisons above vacuous."""
    prompt, am = batch()
    runs = {c: block_generate(model, prompt, am, gen_length=13, return_stats=True, **CASES[c])
            for c in ("top-k", "threshold", "editing")}
    (xk, sk), (xt, st), (xe, se) = runs["top-k"], runs["threshold"], runs["editing"]
    assert sum(st.calls_per_block) < sum(sk.calls_per_block) and not torch.equal(xt, xk)
    assert sum(se.calls_per_block) > sum(st.calls_per_block) and not torch.equal(xe, xt)


def test_cache_with_temperature_and_a_generator(model):
    prompt, am = batch()
    runs = [block_generate(model, prompt, am, gen_length=13, temperature=1.0, cache=c,
                           generator=torch.Generator().manual_seed(7)) for c in ("exact", None)]
    assert torch.equal(*runs)
    other = block_generate(model, prompt, am, gen_length=13, temperature=1.0,
                           generator=torch.Generator().manual_seed(8))
    greedy = block_generate(model, prompt, am, gen_length=13)
    assert not torch.equal(runs[0], other) and not torch.equal(runs[0], greedy)


def test_a_cache_from_the_last_denoising_step_is_caught(model, monkeypatch):
    """The planted bug: keep each block's keys and values from its last denoising step (whose
    input still held masks) instead of its final tokens. The tokens must change."""
    prompt, am = batch()
    exact = block_generate(model, prompt, am, gen_length=13, threshold=None)

    def last_step_logits(self, x, am, s, e):
        if self.C < s:   # a new block: adopt the previous block's keys/values of its last step
            self.kv, self.C = getattr(self, "pending", None), s
        start = 0 if self.kv is None else s
        h, kv = self.model.hidden_states(x[:, start:e], am[:, :e], past_kv=self.kv,
                                         return_kv=True, output_positions=slice(s - start, e - start),
                                         check_ids=False)
        self.pending = [(k[:, :, :e], v[:, :, :e]) for k, v in kv]
        return self.model.lm_head(h)

    monkeypatch.setattr(bg._Runner, "logits", last_step_logits)
    stale = block_generate(model, prompt, am, gen_length=13, threshold=None)
    assert not torch.equal(stale, exact)


def test_stop_at_eos_keeps_running_rows_and_pads_finished_ones(model):
    prompt, am = batch()
    x, st = block_generate(model, prompt, am, gen_length=13, threshold=0.15, stop_at_eos=True,
                           return_stats=True)
    full = block_generate(model, prompt, am, gen_length=13, threshold=0.15)
    gen, gen_full = x[:, 10:], full[:, 10:]
    finished = (gen == EOS).any(1)
    assert finished.any() and not finished.all(), "the case must finish some rows, not all"
    for b in range(3):
        if finished[b]:
            first = int((gen[b] == EOS).nonzero()[0])
            assert torch.equal(gen[b, :first + 1], gen_full[b, :first + 1])
            assert (gen[b, first:] == EOS).all()
        else:
            assert torch.equal(gen[b], gen_full[b])
    assert st.finished_rows_per_block[-1] == int(finished.sum())


def llada2_step(logits, block, k, threshold):
    """LLaDA2's generate step (modeling_llada2_moe.py), transcribed for one row: x0 =
    argmax, p = softmax prob of x0; if at least k masked positions have p > threshold commit
    those, else the top min(k, masks)."""
    p = torch.softmax(logits.float(), -1)
    x0 = logits.argmax(-1)
    conf = torch.where(block == MASK, p.gather(-1, x0[:, None])[:, 0], -torch.inf)
    high = conf > threshold
    if int(high.sum()) >= k:
        take = high
    else:
        take = torch.zeros_like(high)
        take[conf.topk(min(k, int((block == MASK).sum()))).indices] = True
    return torch.where(take, x0, block)


def test_one_step_is_llada2s_rule(model, monkeypatch):
    """Each step equals the transcription of LLaDA2's rule on the same logits."""
    seen = []
    real = bg.remask_step

    def spy(logits, x, k, **kw):
        out = real(logits, x, k, **kw)
        seen.append((logits.clone(), x.clone(), k, out[0].clone()))
        return out

    monkeypatch.setattr(bg, "remask_step", spy)
    prompt, am = batch()
    block_generate(model, prompt, am, gen_length=13, threshold=0.12, steps=3)
    assert len(seen) > 4
    for logits, x, k, new in seen:
        for b in range(x.shape[0]):
            assert torch.equal(new[b], llada2_step(logits[b], x[b], k, 0.12))


def test_transfer_schedule():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert sum(transfer_schedule(37, 5)) == 37


def test_bad_arguments(model):
    prompt, am = batch()
    llada1 = LLaDAModel(LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=32,
                                    vocab_size=V, embedding_size=V, mask_token_id=MASK,
                                    eos_token_id=EOS, pad_token_id=PAD))
    cases = [
        (dict(model=llada1), ValueError, "not in block-diffusion mode"),
        (dict(model=torch.nn.Linear(2, 2)), TypeError, "patch_llada2"),
        (dict(block_length=6), ValueError, r"multiple of the model's block size \(4\)"),
        (dict(cache="approximate"), ValueError, "cache must be one of"),
        (dict(gen_length=0), ValueError, "gen_length must be a positive int"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(threshold=float("nan")), ValueError, "threshold must be a finite float"),
        (dict(prompt=prompt.float()), TypeError, "prompt must be a"),
        (dict(attention_mask=am[:, :4]), ValueError, "attention_mask must have the prompt's shape"),
        (dict(gen_length=200), ValueError, "the model has 128"),
        (dict(mask_id=V), ValueError, r"mask_id \(64\) is outside"),
    ]
    for kw, exc, msg in cases:
        args = dict(model=model, prompt=prompt, attention_mask=am, gen_length=8)
        args.update(kw)
        with pytest.raises(exc, match=msg):
            block_generate(args.pop("model"), args.pop("prompt"), **args)


def test_uniform_corruption_cache_prompt_and_random_ids(model):
    """corruption="uniform" (parity with diffusers' DiffusionGemmaPipeline:
    tests/test_block_generate_diffusers.py): the exact cache gives the full recompute's tokens
    with the prompt's last partial block and editing; the prompt stays; a block
    takes exactly `steps` calls, more than b allowed; other random ids give other tokens."""
    prompt, am = batch()
    kw = dict(gen_length=13, corruption="uniform", steps=5, threshold=0.2, editing_threshold=0.3,
              return_stats=True)
    x, st = block_generate(model, prompt, am, generator=torch.Generator().manual_seed(0), **kw)
    ref, st_ref = block_generate(model, prompt, am, cache=None,
                                 generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(x, ref) and torch.equal(x[:, :10], prompt)
    assert st.calls_per_block == st_ref.calls_per_block == [5] * 4          # blocks 2..5
    other = block_generate(model, prompt, am, generator=torch.Generator().manual_seed(1), **kw)[0]
    assert not torch.equal(other, x)


def test_uniform_corruption_bad_arguments(model):
    prompt, am = batch()
    for kw, msg in [(dict(corruption="gaussian"), "corruption must be one of"),
                    (dict(corruption="uniform", editing_threshold=0.0),
                     r"editing_threshold must be None or > 0 with corruption='uniform'")]:
        with pytest.raises(ValueError, match=msg):
            block_generate(model, prompt, am, gen_length=8, **kw)
