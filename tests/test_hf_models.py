"""training.hidden_and_head for transformers models other than LLaDA's (issue 12 item 3):
Qwen2 (Dream's and SDAR's base architecture, built into transformers) and LLaDA2.0's MoE file
(from shared/oracles), extra model arguments passed through, and LLaDA's losses on them."""

import sys

import pytest
import torch

from llada_kernels import ops, training
from oracles import oracle_dir

transformers = pytest.importorskip("transformers")
V, MASK = 64, 63


def qwen2(tie=False, seed=0):
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, mask_token_id=MASK)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def llada2():
    sys.path.insert(0, str(oracle_dir("dllm")))
    try:
        from llada2.configuration_llada2_moe import LLaDA2MoeConfig
        from llada2.modeling_llada2_moe import LLaDA2MoeModelLM
    finally:
        sys.path.pop(0)
    cfg = LLaDA2MoeConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                          num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=32,
                          max_position_embeddings=256, embedding_dropout=0.0,
                          attention_dropout=0.0, output_dropout=0.0, pad_token_id=60)
    torch.manual_seed(0)
    return LLaDA2MoeModelLM(cfg).eval()


MODELS = {"qwen2": qwen2, "qwen2_tied": lambda: qwen2(tie=True), "llada2_moe": llada2}


def ids_and_mask(B=2, L=9, seed=0):  # row 1 right-padded (B >= 2)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, -3:] = 0
    return ids, am


@pytest.mark.parametrize("name", list(MODELS))
def test_hidden_times_head_is_the_models_logits(name):
    model = MODELS[name]()
    ids, am = ids_and_mask()
    hidden, (w, b) = training.hidden_and_head(model, ids, am)
    assert hidden.shape == (2, 9, w.shape[1]) and w.shape[0] == V
    assert w is model.get_output_embeddings().weight
    want = model(ids, attention_mask=am).logits
    torch.testing.assert_close(torch.nn.functional.linear(hidden, w, b).float(), want.float(),
                               rtol=1e-5, atol=1e-5)
    rows = torch.rand(2, 9, generator=torch.Generator().manual_seed(1)) < 0.5
    h_rows, _ = training.hidden_and_head(model, ids, am, rows=rows)
    torch.testing.assert_close(h_rows, hidden[rows])


def test_position_ids_pass_through():
    """Extra arguments reach the model: position ids with gaps (RoPE sees relative positions,
    so a uniform shift would change nothing) change the hidden states exactly as they change
    the model's own logits."""
    model = qwen2()
    ids, am = ids_and_mask()
    pos = torch.tensor([0, 1, 2, 10, 11, 12, 30, 31, 32])[None].expand(2, -1)
    hidden, (w, _) = training.hidden_and_head(model, ids, am, position_ids=pos)
    plain, _ = training.hidden_and_head(model, ids, am)
    assert not torch.allclose(hidden, plain)
    torch.testing.assert_close(hidden @ w.T, model(ids, attention_mask=am, position_ids=pos).logits,
                               rtol=1e-5, atol=1e-5)


def test_4d_mask_passes_through_llada2():
    """LLaDA2's forward takes a 4-D additive mask (its generate's block-causal one)."""
    model = llada2()
    ids = ids_and_mask(B=2, L=8)[0][:1]
    blocks = torch.ones(2, 2).tril().repeat_interleave(4, 0).repeat_interleave(4, 1)
    mask = blocks.log()[None, None]
    hidden, (w, _) = training.hidden_and_head(model, ids, mask)
    torch.testing.assert_close((hidden @ w.T).float(), model(ids, attention_mask=mask).logits.float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2", "llada2_moe"])
def test_pretrain_loss_on_a_transformers_model_matches_the_logits_path(name):
    """training.pretrain_loss (hidden states of the masked rows into the fused loss) against
    the loss on the model's own logits, values and gradients, same noise, in train mode."""
    model = MODELS[name]().train()
    ids, _ = ids_and_mask(B=3, L=10)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    loss = training.pretrain_loss(model, ids, mask_id=MASK, generator=g())
    loss.backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    noisy, masked, p_mask = training.forward_process(ids, mask_id=MASK, generator=g())
    assert masked.any()
    want = training.llada_pretrain_loss(model(noisy).logits.float(), ids, masked, p_mask)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, [p.grad for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_scaled_logits_are_refused():
    model = qwen2()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping=30.0"):
        training.hidden_and_head(model, ids_and_mask()[0])
    assert not training._has_head(model)


def test_a_model_without_lm_head_is_named():
    with pytest.raises(TypeError, match=r"hidden_and_head: Linear is neither .* got no lm_head"):
        training.hidden_and_head(torch.nn.Linear(2, 2), ids_and_mask()[0])
    body = transformers.Qwen2Model(qwen2().config)
    with pytest.raises(TypeError, match="get_output_embeddings"):
        training.hidden_and_head(body, ids_and_mask()[0])


# --------------------------------------------------------------------------------------------
# generate with a transformers model (issue 12 item 4)
# --------------------------------------------------------------------------------------------

class Bare(torch.nn.Module):
    """A transformers model behind a module with no .device (as a user's wrapper may be)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, attention_mask=None, past_key_values=None, use_cache=False):
        return self.inner(x, attention_mask=attention_mask, past_key_values=past_key_values,
                          use_cache=use_cache)


def prompt_batch():
    p = torch.randint(0, V - 2, (2, 5), generator=torch.Generator().manual_seed(4))
    am = torch.ones(2, 5, dtype=torch.long)
    am[1, :2] = 0  # left padding
    p[1, :2] = 60
    return p, am


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_prefix_cache_with_a_causal_transformers_model_is_exact(cfg_scale):
    """On a causal model the keys and values left of a block never depend on what follows, so
    Fast-dLLM's prefix cache is exact there: the same tokens as without it, while the block's
    later steps feed the model only the positions from the window on."""
    from llada_kernels.generate import generate

    model = Bare(qwen2(seed=2))
    assert not hasattr(model, "device")
    p, am = prompt_batch()
    kw = dict(steps=8, gen_length=8, block_length=4, mask_id=MASK, cfg_scale=cfg_scale,
              return_stats=True)
    seen = []
    model.inner.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    exact, s0 = generate(model, p, am, **kw)
    assert seen == [13] * 8
    seen.clear()
    cached, s1 = generate(model, p, am, prefix_cache=True, **kw)
    assert torch.equal(cached, exact) and s0.model_calls == s1.model_calls == 8
    assert seen == [13, 8, 8, 8, 13, 4, 4, 4]   # blocks start at 5 and 9 of 13 positions
    assert not (exact == MASK).any()


def test_prefix_cache_is_refused_by_the_released_llada_file():
    from llada_kernels.generate import generate
    from oracles import released_llada
    from test_trainer import tiny_model

    hf = released_llada(tiny_model())
    p = torch.randint(0, 30, (1, 4))
    with pytest.raises(ValueError, match=r"prefix_cache is not supported for this model: the "
                                         r"released modeling_llada.py refuses past_key_values"):
        generate(hf, p, steps=2, gen_length=4, block_length=4, prefix_cache=True)
    out = generate(hf, p, steps=2, gen_length=4, block_length=4)  # without the cache: fine
    assert out.shape == (1, 8)
