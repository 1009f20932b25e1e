"""Parity with diffusers' LLaDA2Pipeline + BlockRefinementScheduler (the public reference for
block sampling; it recomputes the whole window every step): at temperature 0, our
block_generate on our model in block-diffusion mode gives its tokens, with and without
LLaDA2.1's editing, for a left-padded batch of prompts of different lengths, with and without
the stop at EOS. diffusers is a test dependency (requirements.txt)."""

import pytest
import torch

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


def ours_for(model, prompt, am, kw):
    return block_generate(
        model, prompt, am, gen_length=13, threshold=kw["threshold"],
        steps=kw["num_inference_steps"], editing_threshold=kw["editing_threshold"],
        max_post_steps=kw.get("max_post_steps", 16), stop_at_eos=kw["eos_early_stop"])[:, 10:]


@pytest.mark.parametrize("case", CASES)
def test_same_tokens_as_diffusers_llada2_pipeline(case):
    model, prompt, am, kw, ref = reference(case)
    ours = ours_for(model, prompt, am, kw)
    if kw["eos_early_stop"]:
        assert (ours == EOS).any(), "the case must reach EOS"
        for a, b in zip(ours, ref):
            assert torch.equal(up_to_first_eos(a), up_to_first_eos(b))
    else:
        assert torch.equal(ours, ref)
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
