"""Parity with diffusers' LLaDA2Pipeline + BlockRefinementScheduler (the public reference for
block sampling; it recomputes the whole window every step): at temperature 0, our
block_generate on our model in block-diffusion mode gives its tokens, with and without
LLaDA2.1's editing, for a left-padded batch of prompts of different lengths, with and without
the stop at EOS. And the scheduler's uniform-corruption mode (DiffusionGemma: no [MASK], blocks
start as random ids): block_generate(corruption="uniform") gives the tokens of diffusers'
DiffusionGemmaPipeline driving our model (behind a small adapter for its encoder/decoder calls)
with the same generator. diffusers is a test dependency (requirements.txt)."""

from types import SimpleNamespace

import pytest
import torch

from llada_kernels import block_generate as bg
from llada_kernels.block_generate import block_generate

from test_block_generate import EOS, MASK, PAD, batch, block_model

diffusers = pytest.importorskip("diffusers", reason="diffusers (a test dependency in "
                                "requirements.txt) is not installed")


def pipeline_tokens(model, prompt, am, **kw):
    pipe = diffusers.LLaDA2Pipeline(model=model, scheduler=diffusers.BlockRefinementScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(input_ids=prompt, attention_mask=am, use_chat_template=False, temperature=0.0,
               mask_token_id=MASK, eos_token_id=EOS, output_type="seq", **kw)
    return out.sequences


def up_to_first_eos(row):
    hit = (row == EOS).nonzero()
    return row if len(hit) == 0 else row[:int(hit[0]) + 1]


CASES = {
    "topk": dict(threshold=1.5, editing_threshold=None, eos_early_stop=False),
    "threshold": dict(threshold=0.12, editing_threshold=None, eos_early_stop=False),
    "few-steps": dict(threshold=0.12, editing_threshold=None, eos_early_stop=False),
    "editing": dict(threshold=0.12, editing_threshold=0.3, eos_early_stop=False),
    "editing-post-steps": dict(threshold=0.12, editing_threshold=0.3, max_post_steps=2,
                               eos_early_stop=False),
    "eos": dict(threshold=0.15, editing_threshold=None, eos_early_stop=True),
    "eos-editing": dict(threshold=0.15, editing_threshold=0.3, eos_early_stop=True),
}


_REF = {}


def reference(case):
    """The model, the batch, the pipeline's arguments and its tokens for `case` (run once)."""
    if case not in _REF:
        model = block_model(seed=1)
        if CASES[case]["eos_early_stop"]:
            with torch.no_grad():  # EOS wins wherever token 43, frequent here, would
                w = model.model.transformer.ff_out.weight
                w[EOS] = 1.05 * w[43]
        prompt, am = batch()
        kw = dict(num_inference_steps=3 if case == "few-steps" else 4, **CASES[case])
        _REF[case] = model, prompt, am, kw, pipeline_tokens(model, prompt, am, gen_length=13,
                                                             block_length=4, **kw)
    return _REF[case]


def assert_same_tokens(ours, ref, eos_early_stop):
    """ours == ref; with the EOS stop, row by row up to each row's first EOS, and the case
    must reach EOS."""
    if eos_early_stop:
        assert (ours == EOS).any(), "the case must reach EOS"
        for a, b in zip(ours, ref):
            assert torch.equal(up_to_first_eos(a), up_to_first_eos(b))
    else:
        assert torch.equal(ours, ref)


def ours_for(model, prompt, am, kw):
    return block_generate(
        model, prompt, am, gen_length=13, threshold=kw["threshold"],
        steps=kw["num_inference_steps"], editing_threshold=kw["editing_threshold"],
        max_post_steps=kw.get("max_post_steps", 16), stop_at_eos=kw["eos_early_stop"])[:, 10:]


@pytest.mark.parametrize("case", CASES)
def test_same_tokens_as_diffusers_llada2_pipeline(case):
    model, prompt, am, kw, ref = reference(case)
    ours = ours_for(model, prompt, am, kw)
    assert_same_tokens(ours, ref, kw["eos_early_stop"])
    assert PAD not in ours[0]


@pytest.mark.parametrize("case, planted", [
    ("editing", dict(editing_threshold=None)),          # no editing
    ("threshold", dict(threshold=None)),                # top-k only
    ("threshold", dict(threshold=0.2)),                 # another threshold
    ("few-steps", dict(num_inference_steps=4)),         # another schedule
])
def test_the_parity_check_fails_on_a_planted_difference(case, planted):
    """Each case exercises what it names: our sampler with that rule changed (planted) no
    longer gives the pipeline's tokens."""
    model, prompt, am, kw, ref = reference(case)
    assert not torch.equal(ours_for(model, prompt, am, {**kw, **planted}), ref)


# ---- uniform corruption: DiffusionGemmaPipeline + BlockRefinementScheduler(mask_token_id=None)

class AsDiffusionGemma(torch.nn.Module):
    """Our block model behind the interface DiffusionGemmaPipeline drives: `model.encoder`
    takes the context (the prompt and the committed canvases; the pipeline's cache is left
    empty, so it is always the whole context), and each decoder call runs our model's whole
    block-causal forward over [context ; canvas] at absolute positions and returns the
    canvas's logits. The pipeline's self-conditioning logits have no counterpart here."""

    def __init__(self, model):
        super().__init__()
        import transformers

        self.inner = model
        self.config = transformers.PretrainedConfig(vocab_size=model.config.embedding_size,
                                                    num_hidden_layers=1)
        self.config.canvas_length = model.config.block_size
        self.model = SimpleNamespace(encoder=self.encode, decoder=SimpleNamespace(
            create_diffusion_decoder_attention_mask=lambda decoder_attention_mask, **_: decoder_attention_mask))

    @property
    def device(self):
        return next(self.parameters()).device

    def encode(self, input_ids, attention_mask, past_key_values, position_ids, **_):
        assert past_key_values.get_seq_length() == 0 and position_ids[0, 0] == 0
        self.context = input_ids

    def forward(self, decoder_input_ids, decoder_attention_mask, decoder_position_ids, **_):
        x = torch.cat([self.context, decoder_input_ids], 1)
        assert decoder_position_ids[0, 0] == self.context.shape[1] and x.shape == decoder_attention_mask.shape
        logits = self.inner(x, attention_mask=decoder_attention_mask).logits
        return SimpleNamespace(logits=logits[:, -decoder_input_ids.shape[1]:])


class Prompts:
    """The processor: hands the pipeline our left-padded batch as its tokenized chat."""

    def __init__(self, prompt, am):
        self.out = dict(input_ids=prompt, attention_mask=am)
        self.tokenizer = SimpleNamespace(eos_token_id=EOS)

    def apply_chat_template(self, messages, **_):
        return self.out


def gemma_tokens(model, prompt, am, seed, steps, threshold, editing_threshold, eos_early_stop):
    scheduler = diffusers.BlockRefinementScheduler(threshold=threshold,
                                                   editing_threshold=editing_threshold)
    pipe = diffusers.DiffusionGemmaPipeline(model=AsDiffusionGemma(model), scheduler=scheduler,
                                            processor=Prompts(prompt, am))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["unused"] * len(prompt), gen_length=U_GEN, num_inference_steps=steps,
               temperature=0.0, eos_early_stop=eos_early_stop, eos_token_id=EOS,
               confidence_threshold=None, generator=torch.Generator().manual_seed(seed),
               output_type="seq")
    return out.sequences


U_LP, U_GEN = 12, 12  # whole blocks (b = 4): the pipeline's canvases start right after the prompt
U_CASES = {
    "uniform-topk": dict(steps=3, threshold=1.5, editing_threshold=None),
    "uniform-threshold": dict(steps=4, threshold=0.12, editing_threshold=None),
    "uniform-few-steps": dict(steps=3, threshold=0.2, editing_threshold=None),
    "uniform-more-steps-than-b": dict(steps=6, threshold=0.25, editing_threshold=None),
    "uniform-editing": dict(steps=4, threshold=0.12, editing_threshold=0.3),
    "uniform-eos": dict(steps=4, threshold=0.15, editing_threshold=None, eos_early_stop=True),
}

_UREF = {}


def uniform_reference(case):
    if case not in _UREF:
        kw = {"eos_early_stop": False, "seed": 7, **U_CASES[case]}
        model = block_model(seed=1)
        if kw["eos_early_stop"]:
            with torch.no_grad():
                w = model.model.transformer.ff_out.weight
                w[EOS] = 1.05 * w[43]
        prompt, am = batch(Lp=U_LP)
        _UREF[case] = model, prompt, am, kw, gemma_tokens(model, prompt, am, **kw)
    return _UREF[case]


def uniform_ours(model, prompt, am, kw, cache="exact"):
    return block_generate(
        model, prompt, am, gen_length=U_GEN, corruption="uniform", steps=kw["steps"],
        threshold=kw["threshold"], editing_threshold=kw["editing_threshold"],
        stop_at_eos=kw["eos_early_stop"], generator=torch.Generator().manual_seed(kw["seed"]),
        cache=cache)[:, U_LP:]


@pytest.mark.parametrize("cache", ["exact", None])
@pytest.mark.parametrize("case", U_CASES)
def test_uniform_corruption_gives_diffusion_gemma_pipelines_tokens(case, cache):
    model, prompt, am, kw, ref = uniform_reference(case)
    ours = uniform_ours(model, prompt, am, kw, cache)
    assert_same_tokens(ours, ref, kw["eos_early_stop"])


@pytest.mark.parametrize("case, planted", [
    ("uniform-editing", dict(editing_threshold=None)),       # no editing
    ("uniform-threshold", dict(threshold=None)),             # quota only
    ("uniform-few-steps", dict(threshold=None)),
    ("uniform-more-steps-than-b", dict(threshold=None)),
    ("uniform-threshold", dict(threshold=0.2)),              # another threshold
    ("uniform-few-steps", dict(steps=4)),                    # another schedule
    ("uniform-more-steps-than-b", dict(steps=4)),
    ("uniform-threshold", dict(seed=8)),                     # other random ids: the model sees them
])
def test_the_uniform_parity_check_fails_on_a_planted_difference(case, planted):
    model, prompt, am, kw, ref = uniform_reference(case)
    assert not torch.equal(uniform_ours(model, prompt, am, {**kw, **planted}), ref)


@pytest.mark.parametrize("case", ["uniform-topk", "uniform-few-steps", "uniform-more-steps-than-b"])
def test_the_uniform_parity_check_fails_on_a_rounded_down_quota(case, monkeypatch):
    """Planted rule change: the cumulative quota rounded down, floor((s + 1) * n / steps)."""
    model, prompt, am, kw, ref = uniform_reference(case)
    monkeypatch.setattr(bg, "uniform_quota", lambda step, n, steps: (step + 1) * n // steps)
    assert not torch.equal(uniform_ours(model, prompt, am, kw), ref)
