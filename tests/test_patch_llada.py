"""patch_llada on the released architecture's own file (dllm's copy of LLaDA's
modeling_llada.py, from shared/oracles; skipped without it): a padded batch runs our op in
every block, with the logits, gradients and training loss of the unpatched model; other
block-causal and 2L biases run our op too; other biases fall back with one warning (issue 12
item 1)."""

import warnings

import pytest
import torch

from llada_kernels import masks, ops, patch, training
from llada_kernels.patch import PatchFallbackWarning, patch_llada, patch_stats
from oracles import released_llada
from test_trainer import MASK, V, tiny_model

B, L, LAYERS = 3, 11, 2


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, -4:] = 0   # right padding (dllm's trainers)
    am[2, :3] = 0    # left padding (LLaDA's batched generate)
    return ids, am


def pair(seed=1, dtype=torch.float32):
    ours = tiny_model(seed=seed).to(dtype)
    return released_llada(ours), released_llada(ours)  # (patched, unpatched)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_padded_batch_runs_the_op_and_keeps_logits_and_gradients(monkeypatch):
    hf, plain = pair()
    patch_llada(hf)
    monkeypatch.setattr(patch, "_dense_key_mask",
                        lambda *a: pytest.fail("the [B, 1, L, L] bias was read"))
    ids, am = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchFallbackWarning)
        got = hf(ids, attention_mask=am).logits
    assert patch_stats(hf) == {"op": LAYERS, "original": 0}
    want = plain(ids, attention_mask=am).logits
    keep = am.bool()  # padded positions' outputs are never used; compare the tokens'
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    (got[keep] ** 2).sum().backward()
    (want[keep] ** 2).sum().backward()
    for a, b in zip(grads(hf), grads(plain)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_comparison_fails_on_a_wrong_key_mask(monkeypatch):
    """Planted bug: the key mask shifted by one key. The logits check above then fails."""
    hf, plain = pair()
    patch_llada(hf)
    real = patch._forward_key_mask

    def shifted(arguments):
        b, l, keep = real(arguments)
        return b, l, keep.roll(1, dims=1)
    monkeypatch.setattr(patch, "_forward_key_mask", shifted)
    ids, am = batch()
    keep = am.bool()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(hf(ids, attention_mask=am).logits[keep],
                                   plain(ids, attention_mask=am).logits[keep], rtol=1e-5, atol=1e-5)


def test_training_loss_in_train_mode_is_the_unpatched_one():
    """The released config's dropouts are 0 (save_pretrained writes them): in train mode the
    patched model runs the op, and LLaDA's pre-training loss (fused, from hidden_and_head) and
    its gradients are those of the unpatched model, padded batch included."""
    hf, plain = pair(seed=3)
    patch_llada(hf)
    hf.train(), plain.train()
    ids, am = batch(seed=4)
    noisy, masked, p_mask = training.forward_process(ids, mask_id=MASK,
                                                     generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (hf, plain):
        h, (w, b) = training.hidden_and_head(m, noisy, attention_mask=am)
        loss = ops.loss.fused_linear_masked_diffusion_loss(h, w, ids, masked & am.bool(), p_mask,
                                                           bias=b) / ids.numel()
        loss.backward()
        losses.append(loss)
    assert patch_stats(hf) == {"op": LAYERS, "original": 0}
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(hf), grads(plain)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_padded_batch_runs_the_op():
    """In bf16 the file casts the bias to bf16 in every block: the key mask still comes from
    attention_mask, once per forward."""
    hf, plain = pair(dtype=torch.bfloat16)
    patch_llada(hf)
    ids, am = batch()
    got, want = hf(ids, attention_mask=am).logits, plain(ids, attention_mask=am).logits
    assert patch_stats(hf) == {"op": LAYERS, "original": 0}
    keep = am.bool()
    torch.testing.assert_close(got[keep].float(), want[keep].float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["float", "bool"])
def test_key_padding_attention_bias_is_read_once_per_forward(monkeypatch, kind):
    """A user's attention_bias [B, 1, L, L] that is key padding: read once (the blocks get
    views of one tensor), then the op."""
    hf, plain = pair()
    patch_llada(hf)
    ids, am = batch()
    see = am.bool()[:, None, None, :].expand(B, 1, L, L)
    bias = see if kind == "bool" else torch.zeros(B, 1, L, L).masked_fill(~see, torch.finfo().min)
    reads = []
    real = patch._dense_key_mask
    monkeypatch.setattr(patch, "_dense_key_mask", lambda s, m: reads.append(1) or real(s, m))
    got = hf(ids, attention_bias=bias).logits
    assert patch_stats(hf) == {"op": LAYERS, "original": 0} and len(reads) == LAYERS
    assert hf._llada_patch.dense[3] is not None  # the key mask it read
    keep = am.bool()
    torch.testing.assert_close(got[keep], plain(ids, attention_bias=bias).logits[keep],
                               rtol=1e-5, atol=1e-5)


def test_dense_key_mask_is_computed_once_per_bias_tensor(monkeypatch):
    hf, _ = pair()
    patch_llada(hf)
    state = hf._llada_patch
    bias = torch.zeros(B, 1, L, L)
    bias[1, ..., -2:] = torch.finfo().min
    computed = []
    real_any = torch.Tensor.any
    first = patch._dense_key_mask(state, bias[:, :, :, :])
    monkeypatch.setattr(torch.Tensor, "any", lambda *a, **k: computed.append(1) or real_any(*a, **k))
    again = patch._dense_key_mask(state, bias[:, :, :, :])        # another view: cached
    assert again is first and computed == []
    bias[0, 0, 0, 0] = 1.0                                        # written in place: read again
    assert patch._dense_key_mask(state, bias[:, :, :, :]) is None and computed


def _structured_bias(kind, length):
    if kind == "causal":
        return torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    if kind == "block_causal_additive":   # the released file's float form: 0 / finfo.min
        see = masks.block_causal(4, seq_len=length).to_dense()[:, None]
        return torch.zeros(see.shape).masked_fill(~see, torch.finfo(torch.float32).min)
    return masks.block_diffusion(3, length // 2).to_dense()[:, None]    # the 2L mask


@pytest.mark.parametrize("kind", ["causal", "block_causal_additive", "two_l"])
def test_block_causal_and_2l_biases_run_the_op(kind):
    """A bias that is block-causal (causal included) or the 2L block-diffusion mask runs our op
    in every block, with the unpatched model's logits (issue 12 item 1)."""
    hf, plain = pair()
    patch_llada(hf)
    ids, _ = batch()
    ids = ids[:, :10]
    bias = _structured_bias(kind, ids.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchFallbackWarning)
        got = hf(ids, attention_bias=bias).logits
    assert patch_stats(hf) == {"op": LAYERS, "original": 0}
    torch.testing.assert_close(got, plain(ids, attention_bias=bias).logits, rtol=1e-5, atol=1e-5)


def test_other_biases_fall_back_with_one_warning():
    """A sliding-window bias is neither key padding nor block-causal nor the 2L mask: the
    original attention runs (same logits), with one PatchFallbackWarning for the model however
    many blocks and calls."""
    hf, plain = pair()
    patch_llada(hf)
    ids, _ = batch()
    i = torch.arange(L)
    window = ((i[:, None] - i[None, :]).abs() <= 2)[None, None]
    with pytest.warns(PatchFallbackWarning, match=r"not key padding, block-causal or the 2L") \
            as record:
        got = hf(ids, attention_bias=window).logits
        hf(ids, attention_bias=window)
    assert len([w for w in record if w.category is PatchFallbackWarning]) == 1
    assert patch_stats(hf) == {"op": 0, "original": 2 * LAYERS}
    torch.testing.assert_close(got, plain(ids, attention_bias=window).logits, rtol=1e-5, atol=1e-5)


def test_additive_bias_that_is_not_a_mask_falls_back():
    hf, plain = pair()
    patch_llada(hf)
    ids, _ = batch()
    alibi_like = -torch.arange(L, dtype=torch.float)[None, None, None, :].expand(1, 1, L, L)
    with pytest.warns(PatchFallbackWarning):
        got = hf(ids, attention_bias=alibi_like.clone()).logits
    assert patch_stats(hf)["op"] == 0
    torch.testing.assert_close(got, plain(ids, attention_bias=alibi_like.clone()).logits)


def test_attention_dropout_in_training_falls_back():
    hf, _ = pair()
    for block in hf.model.transformer.blocks:  # each block holds its own config
        block.config.attention_dropout = 0.1
    patch_llada(hf).train()
    ids, am = batch()
    with pytest.warns(PatchFallbackWarning, match="attention dropout 0.1 in training"):
        hf(ids, attention_mask=am)
    assert patch_stats(hf) == {"op": 0, "original": LAYERS}
    hf.eval()
    hf(ids, attention_mask=am)
    assert patch_stats(hf) == {"op": LAYERS, "original": LAYERS}


def test_patch_stats_refuses_an_unpatched_model():
    with pytest.raises(TypeError, match="was not patched"):
        patch_stats(tiny_model())
