"""llada_kernels.training: pre-training and SFT losses against GUIDELINES.md on full logits
(values and gradients), the Monte-Carlo log-likelihood against get_log_likelihood.py, argument
errors, the deprecated llada_kernels.trainer alias, and llada_kernels.patch.patch_llada on a
module that mirrors the released modeling_llada.py."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llada_kernels import ops, training
from llada_kernels.patch import patch_llada
from llada_kernels.model import LLaDAConfig, LLaDAModel
from llada_kernels.reference.llada_official import (official_loglik_forward_process, official_mc_loss,
                                                    official_pretrain_loss, official_sft_loss)

V, MASK, EOS = 40, 39, 38


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=V,
                embedding_size=V, max_sequence_length=64, rope_theta=10000.0,
                mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS)
    args.update(kw)
    return LLaDAModel(LLaDAConfig(**args))


# --------------------------------------------------------------------------------------------
# A module mirroring the released modeling_llada.py: LLaDAModelLM.model.transformer with
# llama blocks whose attention goes through _scaled_dot_product_attention (KV heads repeated
# there), a [B, 1, 1, L] float padding bias, and the lm_head in transformer.ff_out.
# --------------------------------------------------------------------------------------------

@dataclass
class MirrorConfig:
    d_model: int
    n_heads: int
    effective_n_kv_heads: int
    weight_tying: bool = False
    scale_logits: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


class MirrorRMS(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MirrorBlock(nn.Module):
    def __init__(self, c, F_):
        super().__init__()
        self.c, D, Dh = c, c.d_model, c.d_model // c.n_heads
        self.attn_norm, self.ff_norm = MirrorRMS(D, c.rms_norm_eps), MirrorRMS(D, c.rms_norm_eps)
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, c.effective_n_kv_heads * Dh, bias=False)
        self.v_proj = nn.Linear(D, c.effective_n_kv_heads * Dh, bias=False)
        self.attn_out = nn.Linear(D, D, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(D, F_, bias=False), nn.Linear(D, F_, bias=False)
        self.ff_out = nn.Linear(F_, D, bias=False)

    def _scaled_dot_product_attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        r = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal)

    def rope(self, t):
        L, Dh = t.shape[-2], t.shape[-1]
        inv = 1.0 / (self.c.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float) / Dh))
        pos = torch.cat([torch.outer(torch.arange(L, dtype=torch.float), inv)] * 2, -1)
        t_ = t.float()
        x1, x2 = t_.view(*t_.shape[:-1], 2, Dh // 2).unbind(-2)
        return (t_ * pos.cos() + torch.cat((-x2, x1), -1) * pos.sin()).type_as(t)

    def attention(self, q, k, v, attention_bias=None):
        B, T, C = q.size()
        c = self.c
        q = q.view(B, T, c.n_heads, C // c.n_heads).transpose(1, 2)
        k = k.view(B, T, c.effective_n_kv_heads, C // c.n_heads).transpose(1, 2)
        v = v.view(B, T, c.effective_n_kv_heads, C // c.n_heads).transpose(1, 2)
        q, k = self.rope(q), self.rope(k)
        att = self._scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, is_causal=False)
        return self.attn_out(att.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x, attention_bias=None):
        n = self.attn_norm(x)
        x = x + self.attention(self.q_proj(n), self.k_proj(n), self.v_proj(n), attention_bias)
        m = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))


@dataclass
class MirrorOutput:
    logits: torch.Tensor


class MirrorModel(nn.Module):
    def __init__(self, c, n_layers, F_, rows):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, c.d_model), ln_f=MirrorRMS(c.d_model, c.rms_norm_eps),
            blocks=nn.ModuleList(MirrorBlock(c, F_) for _ in range(n_layers))))
        if not c.weight_tying:
            self.transformer["ff_out"] = nn.Linear(c.d_model, rows, bias=False)

    def forward(self, input_ids, attention_mask=None):
        B, L = input_ids.shape
        x = self.transformer.wte(input_ids)
        bias = None
        if attention_mask is not None and (attention_mask == 0).any():
            bias = (1.0 - attention_mask.float()[:, None, None, :]) * torch.finfo(torch.float).min
        for block in self.transformer.blocks:
            x = block(x, bias)
        x = self.transformer.ln_f(x)
        if self.config.weight_tying:
            return MirrorOutput(F.linear(x, self.transformer.wte.weight))
        return MirrorOutput(self.transformer.ff_out(x))


class MirrorLM(nn.Module):
    def __init__(self, ours: LLaDAModel):
        super().__init__()
        cfg = ours.config
        c = MirrorConfig(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.weight_tying, False,
                         cfg.rms_norm_eps, cfg.rope_theta)
        self.model = MirrorModel(c, cfg.n_layers, cfg.hidden_size, cfg.rows)
        self.load_state_dict(ours.state_dict())  # the released names: strict load

    @property
    def device(self):
        return self.model.transformer.wte.weight.device

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids, attention_mask=attention_mask)


def padded_ids(B=3, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :3] = 0
    am[2, :L] = 0  # a row with every key padded: zeros from the op, uniform from SDPA's bias
    return ids, am


# --------------------------------------------------------------------------------------------
# patch_llada
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tying", [False, True])
def test_mirror_is_the_released_structure(tying):
    ours = tiny_model(weight_tying=tying).eval()
    mirror = MirrorLM(ours).eval()
    ids, am = padded_ids()
    am[2] = 1
    torch.testing.assert_close(mirror(ids, attention_mask=am).logits,
                               ours(ids, attention_mask=am).logits, rtol=1e-5, atol=1e-5)


def test_patch_llada_keeps_outputs_and_uses_the_op(monkeypatch):
    mirror = MirrorLM(tiny_model()).eval()
    ids, am = padded_ids()
    am[2, 9] = 1  # keep one key: rows with no key differ by design (zeros vs SDPA's mean)
    before = [mirror(ids).logits, mirror(ids, attention_mask=am).logits]
    calls = []
    real = ops.attention.attention
    monkeypatch.setattr(ops.attention, "attention",
                        lambda *a, **k: calls.append(k["key_padding_mask"]) or real(*a, **k))
    assert patch_llada(mirror) is mirror
    patch_llada(mirror)  # idempotent
    after = [mirror(ids).logits, mirror(ids, attention_mask=am).logits]
    assert len(calls) == 4 and calls[0] is None and calls[2].dtype == torch.bool
    assert torch.equal(calls[2], am.bool())
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_patch_llada_leaves_other_biases_to_the_original():
    mirror = MirrorLM(tiny_model()).eval()
    patch_llada(mirror)
    block = mirror.model.transformer.blocks[0]
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    causal = torch.full((5, 5), float("-inf")).triu(1)[None, None]
    want = block._llada_original_sdpa(q, k, v, attn_mask=causal)
    torch.testing.assert_close(block._scaled_dot_product_attention(q, k, v, attn_mask=causal), want)
    torch.testing.assert_close(block._scaled_dot_product_attention(q, k, v, is_causal=True),
                               block._llada_original_sdpa(q, k, v, is_causal=True))


def test_patch_llada_refuses_other_models():
    with pytest.raises(TypeError, match="modeling_llada.py"):
        patch_llada(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# Losses against GUIDELINES.md
# --------------------------------------------------------------------------------------------

def guidelines_noise(input_ids, eps=1e-3):
    """GUIDELINES.md forward_process, from the global RNG (mask id ours)."""
    b, l = input_ids.shape
    t = torch.rand(b)
    p_mask = ((1 - eps) * t + eps)[:, None].repeat(1, l)
    masked = torch.rand((b, l)) < p_mask
    return torch.where(masked, MASK, input_ids), masked, p_mask


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("released", [False, True])
def test_pretrain_loss_matches_guidelines(released):
    ids, _ = padded_ids(B=4, L=12)
    ours = tiny_model(seed=1)
    model = MirrorLM(ours) if released else ours
    torch.manual_seed(7)
    loss = training.pretrain_loss(model, ids, mask_id=MASK)
    loss.backward()
    g = grads(model)
    model.zero_grad()
    torch.manual_seed(7)
    noisy, masked, p_mask = guidelines_noise(ids)
    assert masked.any()
    ref = official_pretrain_loss(model(noisy).logits, ids, masked, p_mask)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sft_loss_matches_guidelines():
    ids, _ = padded_ids(B=4, L=12)
    prompt_lengths = torch.tensor([3, 5, 1, 11])
    model = tiny_model(seed=2, weight_tying=True)
    torch.manual_seed(3)
    loss = training.sft_loss(model, ids, prompt_lengths)  # mask id from the config
    loss.backward()
    g = grads(model)
    model.zero_grad()
    torch.manual_seed(3)
    noisy, _, p_mask = guidelines_noise(ids)
    prompt = torch.arange(12)[None] < prompt_lengths[:, None]
    noisy[prompt] = ids[prompt]
    masked = noisy == MASK
    assert masked.any() and not (masked & prompt).any()
    ref = official_sft_loss(model(noisy).logits, ids, masked, p_mask, prompt_lengths)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_losses_never_materialise_full_logits(monkeypatch):
    """The loss reads hidden states: the model's lm_head over [B, L] never runs."""
    model = tiny_model()
    monkeypatch.setattr(model, "lm_head", lambda h: pytest.fail("full logits were formed"))
    ids, _ = padded_ids()
    training.pretrain_loss(model, ids).backward()
    training.sft_loss(model, ids, torch.tensor([2, 2, 2])).backward()


@pytest.mark.parametrize("loss", ["pretrain", "sft"])
def test_losses_run_the_last_layer_on_masked_rows_only(loss):
    """pretrain_loss and sft_loss ask the model for the masked rows only (the last block's
    MLP sees N rows). Value and gradients equal the unmodified path (full hidden states into
    the fused loss, same noise): against that path in float64, the error is at most 2x that
    of the unmodified path in float32."""
    ids, am = padded_ids(B=4, L=12)
    prompt_lengths = torch.tensor([3, 5, 1, 11])

    def run(masked_rows_only, dtype):
        model = tiny_model(seed=5).to(dtype)
        model.backend = "reference" if dtype == torch.float64 else None
        if not masked_rows_only:  # the unmodified path: every row through the last layer
            hs = model.hidden_states
            model.hidden_states = lambda x, m=None, output_positions=None: hs(x, m)[output_positions]
        seen = []
        model.model.transformer.blocks[-1].ff_proj.register_forward_hook(
            lambda m, inp, out: seen.append(inp[0].shape[:-1]))
        torch.manual_seed(11)
        value = (training.pretrain_loss(model, ids, mask_id=MASK) if loss == "pretrain"
                 else training.sft_loss(model, ids, prompt_lengths, mask_id=MASK))
        value.backward()
        return seen, [value.double()] + [p.grad.double() for p in model.parameters()]

    torch.manual_seed(11)
    _, masked, _ = training.forward_process(ids, mask_id=MASK,
                                           prompt_lengths=None if loss == "pretrain" else prompt_lengths)
    seen, ours = run(True, torch.float32)
    assert seen == [(int(masked.sum()),)] and 0 < masked.sum() < masked.numel()
    _, exact = run(False, torch.float64)
    seen, full = run(False, torch.float32)
    assert seen == [(4, 12)]
    for e, f, o in zip(exact, full, ours):
        assert (o - e).abs().max() <= 2 * (f - e).abs().max() + 1e-8


# --------------------------------------------------------------------------------------------
# Monte-Carlo log-likelihood against get_log_likelihood.py
# --------------------------------------------------------------------------------------------

def test_mc_forward_process_follows_the_reference():
    g = torch.Generator().manual_seed(0)
    for b, Lp, T in [(16, 5, 7), (4, 0, 1), (8, 3, 20)]:
        seq = torch.randint(0, V - 2, (b, Lp + T), generator=g)
        noisy, is_mask, ratio = training.mc_forward_process(seq, Lp, mask_id=MASK, generator=g)
        assert torch.equal(noisy, torch.where(is_mask, MASK, seq)) and ratio.dtype == torch.float32
        n = is_mask.sum(1)
        assert not is_mask[:, :Lp].any() and ((n >= 1) & (n <= T)).all()
        torch.testing.assert_close(ratio, n / T)
        # The counts are the reference's for the same start k (= the first row's count).
        k = int(n[0])
        x = torch.round(torch.linspace(float(k), k + (b - 1) * (T / b), steps=b)).long()
        assert torch.equal(n, ((x - 1) % T) + 1)
    # And the reference's own draw spreads its counts the same way.
    torch.manual_seed(0)
    _, ref_ratio = official_loglik_forward_process(torch.zeros(8, 23, dtype=torch.long),
                                                   torch.arange(23) < 3, MASK)
    ref_n = (ref_ratio[:, 0] * 20).round().long()
    k = int(ref_n[0])
    assert torch.equal(ref_n, (torch.round(torch.linspace(float(k), k + 7 * 2.5, steps=8)).long() - 1) % 20 + 1)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_mc_batch_loss_matches_reference(cfg_scale):
    model = tiny_model(seed=4).eval()
    prompt, answer = torch.randint(0, V - 2, (5,)), torch.randint(0, V - 2, (7,))
    seq = torch.cat([prompt, answer])[None].repeat(8, 1)
    torch.manual_seed(0)
    prompt_index = torch.arange(12) < 5
    perturbed, p_mask = official_loglik_forward_process(seq, prompt_index, MASK)
    is_mask = perturbed == MASK
    with torch.no_grad():
        ref = official_mc_loss(model, seq, perturbed, p_mask, prompt_index, cfg_scale, MASK)
        ours = training.mc_batch_loss(model, seq, is_mask, p_mask[:, 0], 5, cfg_scale=cfg_scale)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_log_likelihood_of_one_token_is_exact():
    """With a one-token answer every sample masks it with ratio 1: the estimate is exactly
    log softmax(logits)[answer] at that position."""
    model = tiny_model(seed=5).eval()
    prompt, answer = torch.randint(0, V - 2, (6,)), torch.tensor([4])
    ll = training.log_likelihood(model, prompt, answer, mc_num=8, batch_size=4)
    x = torch.cat([prompt, torch.tensor([MASK])])[None]
    with torch.no_grad():
        want = torch.log_softmax(model(x).logits[0, -1], -1)[4]
    assert math.isclose(ll, float(want), rel_tol=1e-5)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        training.log_likelihood(model, prompt, answer, mc_num=6, batch_size=4)


def test_log_likelihood_is_reproducible_and_ranks_answers():
    model = tiny_model(seed=6).eval()
    prompt = torch.randint(0, V - 2, (4,))
    a = training.log_likelihood(model, prompt, torch.tensor([1, 2, 3]), mc_num=16, batch_size=8,
                               generator=torch.Generator().manual_seed(0))
    b = training.log_likelihood(model, prompt, torch.tensor([1, 2, 3]), mc_num=16, batch_size=8,
                               generator=torch.Generator().manual_seed(0))
    assert a == b and a < 0


def test_log_likelihood_of_a_logits_only_model_is_the_same():
    """One estimator for every model: a plain callable returning logits takes the logits path,
    an LLaDAModel the fused one; with the same noise they agree."""
    model = tiny_model(seed=6).eval()
    prompt, answer = torch.randint(0, V - 2, (4,)), torch.randint(0, V - 2, (5,))

    def logits_only(ids):
        return model(ids).logits

    for cfg_scale in (0.0, 1.0):
        a, b = (training.log_likelihood(m, prompt, answer, mc_num=8, batch_size=4, cfg_scale=cfg_scale,
                                        mask_id=MASK, generator=torch.Generator().manual_seed(2))
                for m in (model, logits_only))
        assert math.isclose(a, b, rel_tol=1e-5)
    assert training.get_log_likelihood is training.log_likelihood  # LLaDA's name


# --------------------------------------------------------------------------------------------
# Bad input names the argument (issue 9 item 13)
# --------------------------------------------------------------------------------------------

def test_sft_prompt_as_long_as_the_sequence_blames_prompt_lengths():
    model = tiny_model()
    ids, _ = padded_ids(B=3, L=10)
    for bad in (torch.tensor([3, 10, 2]), torch.tensor([3, -1, 2])):
        with pytest.raises(ValueError, match=r"sft_loss: prompt_lengths\[1\] = -?1?0? must be in \[0, L\) = \[0, 10\)"):
            training.sft_loss(model, ids, bad)
        with pytest.raises(ValueError, match=r"llada_sft_loss: prompt_lengths\[1\]"):
            training.llada_sft_loss(torch.randn(3, 10, V), ids, torch.ones(3, 10, dtype=torch.bool),
                                    torch.ones(3), bad)


@pytest.mark.parametrize("bad,exc,match", [
    (torch.tensor([3, 2]), ValueError, r"prompt_lengths must have shape \[B\] = \[3\]; got \[2\]"),
    (torch.tensor([[3], [2], [1]]), ValueError, r"shape \[B\] = \[3\]; got \[3, 1\]"),
    (torch.tensor([3.0, 2.0, 1.0]), TypeError, r"prompt_lengths must be a \[B\] integer tensor"),
    ([3, 2, 1], TypeError, r"prompt_lengths must be a \[B\] integer tensor; got list"),
])
def test_wrong_prompt_lengths_are_named(bad, exc, match):
    ids, _ = padded_ids(B=3, L=10)
    with pytest.raises(exc, match=match):
        training.sft_loss(tiny_model(), ids, bad)
    with pytest.raises(exc, match=match):
        training.forward_process(ids, prompt_lengths=bad)


@pytest.mark.parametrize("eps", [float("nan"), 0.0, -0.1, 1.5, float("inf"), "0.1"])
def test_pretrain_loss_refuses_bad_eps(eps):
    ids, _ = padded_ids()
    with pytest.raises(ValueError, match=r"pretrain_loss: eps must be a float in \(0, 1\]"):
        training.pretrain_loss(tiny_model(), ids, eps=eps)
    with pytest.raises(ValueError, match=r"forward_process: eps must be a float in \(0, 1\]"):
        training.forward_process(ids, eps=eps)


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0, mc_num=0), r"mc_num must be a positive int; got 0"),
    (dict(batch_size=0), r"batch_size must be a positive int; got 0"),
    (dict(batch_size=2.0), r"batch_size must be a positive int; got 2.0"),
    (dict(mc_num=-4, batch_size=2), r"mc_num must be a positive int; got -4"),
    (dict(cfg_scale=float("nan")), r"cfg_scale must be a finite float >= 0; got nan"),
    (dict(answer=torch.tensor([], dtype=torch.long)), r"answer is empty"),
    (dict(prompt=torch.zeros(1, 3, dtype=torch.long)), r"prompt must have 1 dimensions"),
])
def test_log_likelihood_bad_arguments(kw, match):
    args = dict(prompt=torch.tensor([1, 2, 3]), answer=torch.tensor([4, 5]), mc_num=4, batch_size=2)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        training.log_likelihood(tiny_model(), **args)


def test_mask_id_outside_the_vocabulary_is_named():
    ids, _ = padded_ids()
    with pytest.raises(ValueError, match=r"pretrain_loss: mask_id \(40\) is outside the model's vocabulary \[0, 40\)"):
        training.pretrain_loss(tiny_model(), ids, mask_id=V)


def test_trainer_is_a_deprecated_alias():
    import importlib
    import sys
    sys.modules.pop("llada_kernels.trainer", None)
    with pytest.warns(DeprecationWarning, match="llada_kernels.training"):
        trainer = importlib.import_module("llada_kernels.trainer")
    assert trainer.pretrain_loss is training.pretrain_loss and trainer.log_likelihood is training.log_likelihood
    assert trainer.patch_llada is patch_llada and trainer.LLADA_MASK_ID == 126336
    masked, ratio = trainer.stratified_masks(8, 3, 5, generator=torch.Generator().manual_seed(0))
    assert masked.shape == (8, 8) and not masked[:, :3].any()
    torch.testing.assert_close(ratio, masked.sum(1) / 5)
