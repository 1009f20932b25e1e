"""The block-diffusion objective (training.block_diffusion_*): value and gradients equal an
eager transcription of dFactory's train_llada2_bd.py step (dense float 2L mask, SDPA, full
logits, CE over labelled positions / their number), with a planted mask leak caught;
complementary masking; BD3-LM's ELBO weighting; packed documents (each document's loss as
if alone, its own noise level); the noise; bad input."""

import pytest
import torch
import torch.nn.functional as F

from llada_kernels import masks, training
from llada_kernels.model import LLaDAConfig, LLaDAModel
from llada_kernels.reference.block_diffusion import dfactory_loss, dfactory_mask, eager_hidden, float_mask

V, MASK, EOS = 64, 63, 61


def model(seed=0, block_size=4):
    torch.manual_seed(seed)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
                      vocab_size=V, embedding_size=V, max_sequence_length=64, rope_theta=10000.0,
                      mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, block_size=block_size)
    return LLaDAModel(cfg)


def data(B=3, L=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 60, (B, L), generator=g)
    noisy, masked, t = training.block_diffusion_noise(x0, mask_id=MASK, generator=g)
    return x0, noisy, masked, t


def grads(m, loss):
    m.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_same(m, ours, ref):
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    g1, g2 = grads(m, ours), grads(m, ref)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)


def test_dfactory_mask_is_masks_block_diffusion():
    for L, b in ((16, 4), (12, 5), (8, 1)):
        assert torch.equal(dfactory_mask(L, b), masks.block_diffusion(b, L).to_dense()[0])


def test_value_and_gradients_equal_dfactorys_eager_step():
    m, (x0, noisy, masked, t) = model(), data()
    ours = training.block_diffusion_loss_from_noise(m, noisy, x0, masked, t)
    assert_same(m, ours, dfactory_loss(m, noisy, x0, masked, 4))


def test_a_leaky_mask_is_caught(monkeypatch):
    """Planted: noisy block n also sees clean block n (its own answers). The check fails."""
    m, (x0, noisy, masked, t) = model(), data()
    ref = dfactory_loss(m, noisy, x0, masked, 4)
    real = masks.block_diffusion

    def leaky(b, L, **kw):
        mk = real(b, L, **kw)
        k = mk.k_mask.clone()
        k[:, 1, L:] -= 1                     # clean key of block m: visible from level 2m on
        return masks.AttentionMask(mk.q_mask, k, "custom")

    monkeypatch.setattr(training.masks, "block_diffusion", leaky)
    ours = training.block_diffusion_loss_from_noise(m, noisy, x0, masked, t)
    assert (ours - ref).abs() > 1e-4          # the check above holds to 1e-5


def test_complementary_masking():
    m = model()
    x0 = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(2))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :3] = False                                   # a prompt
    noisy, masked, t = training.block_diffusion_noise(
        x0, mask_id=MASK, maskable=maskable, complementary=True,
        generator=torch.Generator().manual_seed(3))
    assert noisy.shape == (4, 16)
    assert torch.equal(masked[:2] ^ masked[2:], maskable)     # every maskable token once
    assert not (masked[:2] & masked[2:]).any()
    torch.testing.assert_close(t[2:], 1 - t[:2])
    loss = training.block_diffusion_loss(m, x0, maskable=maskable, complementary=True,
                                         generator=torch.Generator().manual_seed(3))
    assert_same(m, loss, dfactory_loss(m, noisy, torch.cat([x0, x0]), masked, 4))


def test_bd3lm_elbo_weighting():
    """loss_weight="elbo", normalize="maskable": sum CE / t over masked, / maskable count
    (dllm's BD3LMTrainer with the linear schedule and token normalisation)."""
    m, (x0, noisy, masked, t) = model(), data()
    ours = training.block_diffusion_loss_from_noise(m, noisy, x0, masked, t, loss_weight="elbo",
                                                    normalize="maskable")
    L = x0.shape[1]
    bias = float_mask(dfactory_mask(L, 4))
    logits = m.lm_head(eager_hidden(m, torch.cat([noisy, x0], 1), bias, torch.arange(L).repeat(2)))
    ce = F.cross_entropy(logits[:, :L].reshape(-1, V), x0.reshape(-1), reduction="none").view_as(t)
    ref = (ce * masked / t).sum() / x0.numel()
    assert_same(m, ours, ref)


def test_packed_documents_train_each_document_as_if_alone():
    """Two rows of packed documents (lengths 6+10 and 16; blocks restart at each start):
    Z * loss equals the sum over documents of Z_d * (the loss of that document alone)."""
    m = model()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 60, (2, 16), generator=g)
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    noisy, masked, t = training.block_diffusion_noise(x0, mask_id=MASK, document_ids=docs,
                                                      noise_range=(0.2, 0.9), generator=g)
    assert t[0, :6].unique().numel() == 1 and t[0, 6:].unique().numel() == 1
    assert t[0, 0] != t[0, 6]                                 # a level per document
    packed = training.block_diffusion_loss_from_noise(m, noisy, x0, masked, t, document_ids=docs)
    pieces = [(0, 0, 6), (0, 6, 16), (1, 0, 16)]
    ref = sum(training.block_diffusion_loss_from_noise(
        m, noisy[r:r + 1, s:e], x0[r:r + 1, s:e], masked[r:r + 1, s:e]) * masked[r, s:e].sum()
        for r, s, e in pieces) / masked.sum()
    assert_same(m, packed, ref)


def test_noise_rates():
    x0 = torch.zeros(400, 64, dtype=torch.long)
    noisy, masked, t = training.block_diffusion_noise(x0, mask_id=MASK,
                                                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(noisy == MASK, masked)
    assert 0.3 <= float(t.min()) and float(t.max()) < 0.8
    assert abs(float(masked.float().mean()) - 0.55) < 0.02


def test_bad_arguments():
    m, (x0, noisy, masked, t) = model(), data()
    bad = [
        (lambda: training.block_diffusion_noise(x0, noise_range=(0.8, 0.3)), ValueError, "noise_range"),
        (lambda: training.block_diffusion_noise(x0, document_ids=torch.tensor([[1, 0] * 8] * 3)),
         ValueError, "non-decreasing"),
        (lambda: training.block_diffusion_loss_from_noise(m, noisy, x0, masked, loss_weight="x"),
         ValueError, "loss_weight"),
        (lambda: training.block_diffusion_loss_from_noise(m, noisy, x0, masked, None, loss_weight="elbo"),
         ValueError, "needs t"),
        (lambda: training.block_diffusion_loss_from_noise(m, noisy, x0[:, :4], masked), ValueError, "input_ids"),
        (lambda: training.block_diffusion_loss(torch.nn.Linear(2, 2), x0, mask_id=MASK), ValueError,
         "block_size is needed"),
    ]
    for fn, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            fn()
