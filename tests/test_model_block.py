"""LLaDAModel in block-diffusion mode (config.block_size): block-causal attention checked by
its defining identities (a block's rows equal the forward of the prefix that ends with it;
later tokens change nothing; a block is bidirectional), one mask per forward for every
layer, the KV cache, and the 2L training input [x_t ; x_0] under masks.block_diffusion
(its clean half is the block-causal forward of x_0, its noisy block n the forward of
[x_0 blocks < n ; x_t block n])."""

import pytest
import torch

from llada_kernels import masks
from llada_kernels.model import LLaDAConfig, LLaDAModel

V, MASK, EOS = 64, 63, 61
TOL = dict(atol=2e-5, rtol=1e-5)


def model(block_size=4, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
                vocab_size=V, embedding_size=V, max_sequence_length=64, rope_theta=10000.0,
                mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, block_size=block_size)
    args.update(kw)
    return LLaDAModel(LLaDAConfig(**args)).eval()


def ids(B=2, L=14, seed=1):
    return torch.randint(0, 60, (B, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_block_rows_equal_the_forward_of_their_prefix():
    m, x = model(), ids()
    h = m.hidden_states(x)
    for e in (4, 8, 12, 14):                 # block ends, and the short last block
        torch.testing.assert_close(h[:, :e], m.hidden_states(x[:, :e]), **TOL)
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 60             # a token of block 2 (positions 8..11)
    hy = m.hidden_states(y)
    torch.testing.assert_close(hy[:, :8], h[:, :8], **TOL)            # earlier blocks: same
    assert (hy[:, 8:12] - h[:, 8:12]).abs().amax(-1).min() > 1e-4     # its whole block moves
    bidir = model(block_size=None)
    bidir.load_state_dict(m.state_dict())
    assert (bidir.hidden_states(y)[:, :8] - h[:, :8]).abs().max() > 1e-4  # the mask matters


@torch.no_grad()
def test_the_mask_is_built_once_per_forward(monkeypatch):
    m, x = model(n_layers=3), ids()
    built, seen = [], []
    real_build = masks.block_causal
    monkeypatch.setattr(masks, "block_causal", lambda *a, **k: built.append(1) or real_build(*a, **k))
    import llada_kernels.model as mm
    real = mm.attention
    monkeypatch.setattr(mm, "attention", lambda q, k, v, mask=None, **kw: seen.append(mask) or real(q, k, v, mask, **kw))
    m.hidden_states(x, output_positions=slice(8, 12))
    assert len(built) == 1 and len(seen) == 3
    assert seen[0] is seen[1] and seen[2].q_len == 4      # the last layer: the rows' queries


@torch.no_grad()
def test_kv_cache_and_key_padding():
    m, x = model(), ids()
    am = torch.ones_like(x, dtype=torch.bool)
    am[1, :3] = False
    full = m.hidden_states(x, am)
    h0, kv = m.hidden_states(x[:, :8], am[:, :8], return_kv=True)
    rest = m.hidden_states(x[:, 8:], am, past_kv=kv)
    torch.testing.assert_close(torch.cat([h0, rest], 1), full, **TOL)
    rows = torch.tensor([[0, 5], [3, 3]])
    torch.testing.assert_close(m.hidden_states(x[:, 8:], am, past_kv=kv, output_positions=rows),
                               rest.gather(1, rows[..., None].expand(-1, -1, 32)), **TOL)


@torch.no_grad()
def test_the_2l_input_under_the_block_diffusion_mask():
    m, x0 = model(), ids(L=12)
    xt = torch.where(torch.rand(x0.shape, generator=torch.Generator().manual_seed(3)) < 0.5, MASK, x0)
    L = x0.shape[1]
    pos = torch.arange(L).repeat(2)
    h = m.hidden_states(torch.cat([xt, x0], 1), mask=masks.block_diffusion(4, L), position_ids=pos)
    torch.testing.assert_close(h[:, L:], m.hidden_states(x0), **TOL)         # clean half
    for n in range(L // 4):
        s, e = 4 * n, 4 * n + 4
        ref = m.hidden_states(torch.cat([x0[:, :s], xt[:, s:e]], 1))[:, s:e]
        torch.testing.assert_close(h[:, s:e], ref, **TOL)                    # noisy block n


def test_bad_arguments():
    m, x = model(), ids()
    with pytest.raises(TypeError, match="mask must be an llada_kernels.masks.AttentionMask"):
        m.hidden_states(x, mask=torch.ones(2, 14, dtype=torch.bool))
    with pytest.raises(ValueError, match="give attention_mask or mask, not both"):
        m.hidden_states(x, torch.ones_like(x), mask=masks.block_causal(4, seq_len=14))
    with pytest.raises(ValueError, match="mask is for batch 1, 10 queries and 10 keys"):
        m.hidden_states(x, mask=masks.block_causal(4, seq_len=10))
    with pytest.raises(ValueError, match=r"position_ids must be a \[L\] or \[B, L\]"):
        m.hidden_states(x, position_ids=torch.arange(13))
    with pytest.raises(ValueError, match=r"position_ids holds -1"):
        m.hidden_states(x, position_ids=torch.arange(14) - 1)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        model(block_size=0)
