"""patch_llada2 on LLaDA2.0's own model file (dllm's copy of modeling_llada2_moe.py, in
../shared/oracles; skipped without it), on a tiny MoE config: patched vs unpatched logits
and gradients with no mask, LLaDA2 generate's dense block-causal mask, dFactory's dense 2L
training mask, and the same masks given as AttentionMasks; the op really runs (and an
unrecognised mask goes to the original attention); its own generate gives the same tokens
patched and unpatched; our block sampler driving it (with and without the cache) gives the
tokens of its own generate at temperature 0; the block-diffusion loss on it equals
dFactory's eager step."""

import copy
import sys

import pytest
import torch

import llada_kernels.patch as patch
from llada_kernels import masks, ops, training
from llada_kernels.block_generate import block_generate
from llada_kernels.patch import dense_to_structured, patch_llada2
from llada_kernels.reference.block_diffusion import dfactory_loss, dfactory_mask, float_mask

from oracles import oracle_dir

pytest.importorskip("transformers")
MASK, EOS = 63, 61


@pytest.fixture(scope="module")
def llada2():
    sys.path.insert(0, str(oracle_dir("dllm")))
    try:
        from llada2.configuration_llada2_moe import LLaDA2MoeConfig
        from llada2.modeling_llada2_moe import LLaDA2MoeModelLM
    finally:
        sys.path.pop(0)
    cfg = LLaDA2MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, num_experts=4, num_experts_per_tok=2, n_group=2,
                          topk_group=1, moe_intermediate_size=32, max_position_embeddings=256,
                          embedding_dropout=0.0, attention_dropout=0.0, output_dropout=0.0,
                          pad_token_id=60)
    torch.manual_seed(0)
    ref = LLaDA2MoeModelLM(cfg).eval()
    with torch.no_grad():  # large weights: decisive, varied tokens (no near-ties)
        for p in ref.parameters():
            if p.dim() > 1:
                p.mul_(20)
        ref.lm_head.weight[MASK] = 0
    return ref, patch_llada2(copy.deepcopy(ref))


def block_mask(blocks, b):
    """LLaDA2 generate's mask: log of a block lower-triangular matrix, [1, 1, nb, nb]."""
    return torch.tril(torch.ones(blocks, blocks)).repeat_interleave(b, 0).repeat_interleave(b, 1)[None, None].log()


def grads(model, out):
    model.zero_grad()
    (out.float().square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_logits_and_gradients_match_the_unpatched_model(llada2, monkeypatch):
    ref, pat = llada2
    x = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(6).repeat(2)[None].expand(2, -1)
    two_l = float_mask(dfactory_mask(6, 2)).expand(2, -1, -1, -1)
    calls = []
    real = ops.attention.attention
    monkeypatch.setattr(ops.attention, "attention", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cases = [  # (unpatched kwargs, patched kwargs, expected mask kind in the op)
        (dict(), dict(), None),
        (dict(attention_mask=block_mask(3, 4)), dict(attention_mask=block_mask(3, 4)), "block_causal"),
        (dict(attention_mask=block_mask(3, 4)), dict(attention_mask=masks.block_causal(4, seq_len=12)),
         "block_causal"),
        (dict(attention_mask=two_l, position_ids=pos), dict(attention_mask=two_l, position_ids=pos),
         "block_diffusion"),
        (dict(attention_mask=two_l, position_ids=pos),
         dict(attention_mask=masks.block_diffusion(2, 6), position_ids=pos), "block_diffusion"),
    ]
    for kw_ref, kw_pat, kind in cases:
        calls.clear()
        a, b = ref(x, **kw_ref).logits, pat(x, **kw_pat).logits
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
        assert len(calls) == 2 and (kind is None and calls[0] is None or calls[0].kind == kind)
        ga, gb = grads(ref, a), grads(pat, b)
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], atol=1e-4, rtol=1e-4, msg=n)
    calls.clear()
    odd = torch.zeros(1, 1, 12, 12)
    odd[..., 3, 7] = float("-inf")                            # not a shape we describe
    torch.testing.assert_close(pat(x, attention_mask=odd).logits, ref(x, attention_mask=odd).logits)
    assert calls == []                                         # the original attention ran


def test_dense_to_structured():
    assert dense_to_structured(block_mask(3, 4)).to_dense().equal(
        masks.block_causal(4, seq_len=12).to_dense())
    causal = torch.ones(7, 7).tril().bool()[None, None]
    padded = causal & torch.tensor([0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    for m in (causal, padded, torch.ones(1, 1, 5, 5, dtype=torch.bool)):
        assert torch.equal(dense_to_structured(m).to_dense(), m[:, 0])
    two_l = float_mask(dfactory_mask(8, 4))
    assert dense_to_structured(two_l).kind == "block_diffusion"
    assert dense_to_structured(torch.eye(4, dtype=torch.bool)[None, None]) is None


def test_its_own_generate_gives_the_same_tokens_patched(llada2):
    ref, pat = llada2
    p = torch.randint(0, 60, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(gen_length=16, block_length=4, steps=4, eos_id=EOS, mask_id=MASK)
    # Its generate casts its mask to bf16, so the unpatched model must run in bf16.
    a = copy.deepcopy(ref).to(torch.bfloat16).generate(p, **kw)
    b = copy.deepcopy(pat).to(torch.bfloat16).generate(p, **kw)
    assert torch.equal(a, b) and a.unique().numel() > 4


PROMPTS = ((1, 8), (2, 6))                                   # Lp + gen_length a multiple of b
# The tiny model's confidences stay below 0.5: at its default 0.95 the threshold never fires
# (every step would be top-k). At 0.3 blocks take 1-3 calls instead of 4.
THRESHOLD = 0.3


@pytest.fixture(scope="module")
def own_tokens(llada2):
    """Its own generate's tokens for each prompt, run once for both cache settings (it is the
    slow part: about 3 s a prompt here)."""
    _, pat = llada2
    out = []
    for seed, Lp in PROMPTS:
        p = torch.randint(0, 60, (1, Lp), generator=torch.Generator().manual_seed(seed))
        out.append((p, pat.generate(p, gen_length=24 - Lp, block_length=4, steps=4, eos_id=EOS,
                                    mask_id=MASK, threshold=THRESHOLD)))
    return out


@pytest.mark.parametrize("cache", ["exact", None])
def test_our_block_sampler_gives_its_generate_tokens(llada2, own_tokens, cache):
    _, pat = llada2
    for p, own in own_tokens:
        Lp = p.shape[1]
        ours = block_generate(pat, p, gen_length=24 - Lp, block_length=4, mask_id=MASK,
                              eos_id=EOS, cache=cache, threshold=THRESHOLD)[0, Lp:]
        first = (ours == EOS).nonzero()
        ours = ours if len(first) == 0 else ours[:int(first[0]) + 1]
        assert torch.equal(own[0], ours)


def test_block_diffusion_loss_on_it_equals_dfactorys_step(llada2):
    ref, pat = llada2
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 60, (2, 8), generator=g)
    noisy, masked, t = training.block_diffusion_noise(x0, mask_id=MASK, generator=g)
    ours = training.block_diffusion_loss_from_noise(pat, noisy, x0, masked, t, block_size=4)
    want = dfactory_loss(ref, noisy, x0, masked, 4, logits_fn=lambda x, bias, pos: ref(
        x, attention_mask=bias, position_ids=pos[None].expand(2, -1)).logits)
    torch.testing.assert_close(ours, want, atol=2e-5, rtol=1e-5)
    ga, gb = grads(ref, want), grads(pat, ours)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-4, rtol=1e-4, msg=n)


def test_refuses_other_models():
    with pytest.raises(TypeError, match="not a model built by LLaDA2"):
        patch_llada2(torch.nn.Linear(2, 2))
    assert patch.IMPLEMENTATION == "llada_kernels"
