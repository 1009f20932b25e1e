"""LLaDAModel: the released architecture and parameter names, config checks, key-padding
attention, the hidden-state and prefix-cache paths, activation checkpointing, and ids outside
the vocabulary. Checkpoints: tests/test_checkpoint.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from llada_kernels.model import LLaDAConfig, LLaDAModel

V, MASK, EOS = 64, 63, 61

# The released LLaDA-8B-Instruct config.json (values from its public file).
RELEASED_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32,
    "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3",
    "use_cache": False, "vocab_size": 126464, "weight_tying": False,
}


def tiny_config(**kw):
    args = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=V,
                embedding_size=V, max_sequence_length=64, rope_theta=10000.0,
                mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS)
    args.update(kw)
    return LLaDAConfig(**args)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return LLaDAModel(tiny_config(**kw)).eval()


# --------------------------------------------------------------------------------------------
# An independent transcription of the released forward (modeling_llada.py, llama blocks),
# with the post-fix padding bias: a float [B, 1, 1, L] bias of finfo.min on padded keys.
# --------------------------------------------------------------------------------------------

def released_forward(model, input_ids, attention_mask=None):
    cfg = model.config
    sd = {k.removeprefix("model.transformer."): v for k, v in model.state_dict().items()}
    B, L = input_ids.shape
    H, Hkv, Dh = cfg.n_heads, cfg.kv_heads, cfg.head_dim

    def rms(x, w):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(x.dtype)

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float) / Dh))
    freqs = torch.einsum("i,j->ij", torch.arange(L, dtype=torch.float), inv_freq)
    pos = torch.cat((freqs, freqs), dim=-1)
    sin, cos = pos.sin()[None, None], pos.cos()[None, None]

    def rope(t):
        t_ = t.float()
        x1, x2 = t_.view(*t_.shape[:-1], 2, Dh // 2).unbind(-2)
        return (t_ * cos + torch.cat((-x2, x1), -1) * sin).type_as(t)

    bias = None
    if attention_mask is not None and (attention_mask == 0).any():
        m = attention_mask.float()[:, None, None, :]
        bias = (1.0 - m) * torch.finfo(torch.float).min
    x = F.embedding(input_ids, sd["wte.weight"])
    for i in range(cfg.n_layers):
        p = lambda n: sd[f"blocks.{i}.{n}.weight"]  # noqa: E731
        n = rms(x, p("attn_norm"))
        q = F.linear(n, p("q_proj")).view(B, L, H, Dh).transpose(1, 2)
        k = F.linear(n, p("k_proj")).view(B, L, Hkv, Dh).transpose(1, 2)
        v = F.linear(n, p("v_proj")).view(B, L, Hkv, Dh).transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=False)
        x = x + F.linear(a.transpose(1, 2).reshape(B, L, -1), p("attn_out"))
        m_ = rms(x, p("ff_norm"))
        x = x + F.linear(F.silu(F.linear(m_, p("ff_proj"))) * F.linear(m_, p("up_proj")), p("ff_out"))
    x = rms(x, sd["ln_f.weight"])
    return F.linear(x, sd["wte.weight"] if cfg.weight_tying else sd["ff_out.weight"])


# --------------------------------------------------------------------------------------------
# Config and names
# --------------------------------------------------------------------------------------------

def test_config_reads_released_config_json():
    cfg = LLaDAConfig.from_dict(RELEASED_CONFIG)
    assert (cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.n_layers) == (4096, 32, 32, 32)
    assert (cfg.hidden_size, cfg.rows, cfg.mask_token_id) == (12288, 126464, 126336)
    assert cfg.extra["init_fn"] == "mitchell"  # unknown fields are kept...
    assert LLaDAConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # ...and written back
    for key, value in RELEASED_CONFIG.items():
        assert cfg.to_dict()[key] == value, key


@pytest.mark.parametrize("field,value", [("block_type", "sequential"), ("alibi", True),
                                         ("layer_norm_type", "default"), ("include_bias", True)])
def test_config_refuses_unsupported_architecture(field, value):
    with pytest.raises(ValueError, match=field):
        LLaDAConfig.from_dict({**RELEASED_CONFIG, field: value})


def test_config_checks_heads():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_config(n_heads=4, n_kv_heads=3)


def test_default_config_writes_the_released_config_json():
    """LLaDAConfig's defaults are LLaDA-8B's: its to_dict is the released config.json, field
    for field (but transformers_version, which transformers writes, and auto_map, on request;
    n_kv_heads defaults to None, which means n_heads in both models)."""
    want = {k: v for k, v in RELEASED_CONFIG.items() if k != "transformers_version"}
    assert LLaDAConfig(n_kv_heads=32).to_dict(auto_map=True) == want
    assert "auto_map" not in LLaDAConfig().to_dict()
    small = tiny_config().to_dict()
    assert small["attention_dropout"] == small["residual_dropout"] == small["embedding_dropout"] == 0.0
    assert small["d_model"] == 32 and small["mask_token_id"] == MASK


@pytest.mark.parametrize("field,value,exc,match", [
    ("rope_theta", 0.0, ValueError, r"rope_theta must be finite and > 0; got 0.0"),
    ("rope_theta", -1e4, ValueError, r"rope_theta must be finite and > 0"),
    ("rope_theta", float("nan"), ValueError, r"rope_theta must be finite and > 0; got nan"),
    ("rope_theta", "10000", TypeError, r"rope_theta must be a number; got '10000'"),
    ("rms_norm_eps", -1e-5, ValueError, r"rms_norm_eps must be finite and > 0"),
    ("rms_norm_eps", float("inf"), ValueError, r"rms_norm_eps must be finite and > 0; got inf"),
    ("mask_token_id", V, ValueError, r"mask_token_id=64 is outside the vocabulary \[0, vocab_size=64\)"),
    ("mask_token_id", -1, ValueError, r"mask_token_id=-1 is outside the vocabulary"),
    ("eos_token_id", 1000, ValueError, r"eos_token_id=1000 is outside"),
    ("pad_token_id", "61", TypeError, r"pad_token_id must be an int; got '61'"),
    ("d_model", "32", TypeError, r"d_model must be an int; got '32' \(str\)"),
    ("n_heads", 0, ValueError, r"n_heads must be >= 1; got 0"),
    ("n_layers", 2.0, TypeError, r"n_layers must be an int; got 2.0"),
    ("n_kv_heads", 0, ValueError, r"n_kv_heads must be >= 1; got 0"),
    ("vocab_size", True, TypeError, r"vocab_size must be an int; got True"),
    ("embedding_size", 32, ValueError, r"embedding_size \(32\) must be >= vocab_size \(64\)"),
    ("max_sequence_length", 0, ValueError, r"max_sequence_length must be >= 1"),
    ("weight_tying", "false", TypeError, r"weight_tying must be a bool"),
])
def test_config_checks_values(field, value, exc, match):
    """Values that gave NaN logits (rope_theta <= 0, rms_norm_eps < 0), a ZeroDivisionError
    (n_heads = 0), or were accepted silently (mask_token_id >= vocab) are refused by name."""
    with pytest.raises(exc, match=f"LLaDAConfig: {match}"):
        tiny_config(**{field: value})
    with pytest.raises(exc, match=match):  # from a config.json, strings and all
        LLaDAConfig.from_dict({**tiny_config().to_dict(), field: value})


def test_config_accepts_an_int_rope_theta():
    assert tiny_config(rope_theta=10000).rope_theta == 10000.0


@pytest.mark.parametrize("tying", [False, True])
def test_parameter_names_are_the_released_ones(tying):
    model = tiny_model(weight_tying=tying)
    block = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
    expected |= {f"model.transformer.blocks.{i}.{n}.weight" for i in range(2) for n in block}
    if not tying:
        expected.add("model.transformer.ff_out.weight")
    assert set(model.state_dict()) == expected
    sd = model.state_dict()
    assert sd["model.transformer.blocks.0.k_proj.weight"].shape == (2 * 8, 32)  # Hkv * Dh
    assert sd["model.transformer.blocks.0.ff_proj.weight"].shape == (48, 32)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_released_transcription(kv_heads, padded):
    model = tiny_model(n_kv_heads=kv_heads)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 11), generator=g)
    am = None
    if padded:
        am = torch.ones(3, 11, dtype=torch.long)
        am[1, :4] = 0
        am[2, :1] = 0
    out = model(ids, attention_mask=am)
    assert out.logits.shape == (3, 11, V)
    ref = released_forward(model, ids, am)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


def test_padded_keys_are_hidden_from_every_query():
    model = tiny_model()
    ids = torch.randint(0, V, (1, 9))
    am = torch.ones(1, 9, dtype=torch.long)
    am[0, :3] = 0
    other = ids.clone()
    other[0, :3] = (ids[0, :3] + 5) % V  # change only padded tokens
    a = model(ids, attention_mask=am).logits[0, 3:]
    b = model(other, attention_mask=am).logits[0, 3:]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(model(ids).logits[0, 3:], a)  # and without the mask they count


def test_bf16_forward_close_to_fp32():
    model = tiny_model()
    ids = torch.randint(0, V, (2, 8))
    ref = model(ids).logits
    bf = model.to(torch.bfloat16)(ids).logits
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), ref, rtol=0.05, atol=0.05)


def test_hidden_states_and_lm_head_give_the_logits():
    model = tiny_model(weight_tying=True)
    ids = torch.randint(0, V, (2, 8))
    h = model.hidden_states(ids)
    assert h.shape == (2, 8, 32)
    torch.testing.assert_close(model.lm_head(h), model(ids).logits)
    assert model.lm_head_weight is model.model.transformer.wte.weight


def test_prefix_kv_gives_the_same_hidden_states():
    """With an unchanged prefix, running the suffix against the prefix's cached keys and
    values is exact (the sampler's prefix cache is approximate only because the suffix
    changes after the prefix was cached)."""
    model = tiny_model()
    ids = torch.randint(0, V, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :2] = 0
    full, kv = model.hidden_states(ids, am, return_kv=True)
    assert kv[0][0].shape == (2, 2, 12, 8)
    past = [(k[:, :, :5], v[:, :, :5]) for k, v in kv]
    tail = model.hidden_states(ids[:, 5:], am, past_kv=past)
    torch.testing.assert_close(tail, full[:, 5:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model.hidden_states(ids[:, 5:], am[:, 5:], past_kv=past)


# --------------------------------------------------------------------------------------------
# output_positions: the last layer only for the rows asked for
# --------------------------------------------------------------------------------------------

def _padded_ids(B=3, L=13, seed=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :3] = 0
    return ids, am


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("sl", [slice(5, 12), slice(0, 13), slice(12, 13), slice(-4, None),
                                slice(3, 100), slice(7, 7)])
def test_output_positions_slice_gives_the_rows_of_the_full_call(kv_heads, sl):
    model = tiny_model(n_kv_heads=kv_heads)
    ids, am = _padded_ids()
    full, kv_full = model.hidden_states(ids, am, return_kv=True)
    h, kv = model.hidden_states(ids, am, return_kv=True, output_positions=sl)
    assert h.shape == full[:, sl].shape
    torch.testing.assert_close(h, full[:, sl], rtol=1e-5, atol=1e-6)
    for (k, v), (k_ref, v_ref) in zip(kv, kv_full):  # keys and values still cover every row
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_output_positions_with_a_cached_prefix():
    model = tiny_model()
    ids, am = _padded_ids()
    full, kv = model.hidden_states(ids, am, return_kv=True)
    past = [(k[:, :, :5], v[:, :, :5]) for k, v in kv]
    tail = model.hidden_states(ids[:, 5:], am, past_kv=past, output_positions=slice(2, 6))
    torch.testing.assert_close(tail, full[:, 7:11], rtol=1e-5, atol=1e-6)  # positions 7..10


def test_output_positions_index_gives_each_row_its_own_positions():
    """A [B, n] index: rows differ per sequence, repeat, and come in any order; RoPE uses
    each query's own position."""
    model = tiny_model()
    ids, am = _padded_ids()
    full = model.hidden_states(ids, am)
    idx = torch.tensor([[12, 0, 5, 5], [3, 4, 11, 1], [6, 6, 6, 6]])
    h = model.hidden_states(ids, am, output_positions=idx)
    assert h.shape == (3, 4, 32)
    torch.testing.assert_close(h, full[torch.arange(3)[:, None], idx], rtol=1e-5, atol=1e-6)
    assert model.hidden_states(ids, am, output_positions=idx[:, :0]).shape == (3, 0, 32)


@pytest.mark.parametrize("ckpt", [False, True])
def test_output_positions_mask_gives_the_same_values_and_gradients(ckpt):
    """A [B, L] bool mask returns hidden[mask], [N, D]; forward and gradients are those of the
    full call indexed afterwards (the trainer's masked-rows path): against the full call in
    float64, the error is at most 2x that of the full call in float32 (the gradients' sums
    over rows only lose their zero terms, which changes the rounding)."""
    ids, am = _padded_ids()
    rows = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.4
    rows[2] = False  # a sequence with no row
    rows[0, -1] = True
    weight = torch.randn(int(rows.sum()), 32, dtype=torch.float64)

    def run(mask, dtype):
        model = tiny_model(seed=3).to(dtype).train()
        model.gradient_checkpointing = ckpt
        model.backend = "reference" if dtype == torch.float64 else None
        h = model.hidden_states(ids, am, output_positions=mask)
        h = h[rows] if mask is None else h
        (h * weight.to(dtype)).sum().backward()
        return [h.double()] + [p.grad.double() for p in model.parameters() if p.grad is not None]

    exact, full, ours = run(None, torch.float64), run(None, torch.float32), run(rows, torch.float32)
    assert ours[0].shape == (int(rows.sum()), 32) and len(ours) == len(exact) == 3 + 9 * 2
    for e, f, o in zip(exact, full, ours):
        assert (o - e).abs().max() <= 2 * (f - e).abs().max() + 1e-7


def test_output_positions_mask_all_and_none():
    model = tiny_model()
    ids, am = _padded_ids()
    full = model.hidden_states(ids, am)
    every = torch.ones(ids.shape, dtype=torch.bool)
    torch.testing.assert_close(model.hidden_states(ids, am, output_positions=every),
                               full.reshape(-1, 32), rtol=1e-5, atol=1e-6)
    assert model.hidden_states(ids, am, output_positions=~every).shape == (0, 32)


def test_output_positions_last_layer_computes_only_those_rows(monkeypatch):
    """The saving itself: the last block's q_proj and MLP see only the output rows, the
    other blocks every row, and every block's k_proj every row."""
    model = tiny_model(n_layers=3)
    ids, am = _padded_ids()
    seen = {}
    for i, block in enumerate(model.model.transformer.blocks):
        for name in ("q_proj", "k_proj", "ff_proj"):
            getattr(block, name).register_forward_hook(
                lambda m, inp, out, key=(i, name): seen.__setitem__(key, inp[0].shape[:-1]))
    model.hidden_states(ids, am, output_positions=slice(4, 6))
    assert seen[(2, "q_proj")] == seen[(2, "ff_proj")] == (3, 2)
    assert seen[(2, "k_proj")] == seen[(1, "q_proj")] == seen[(1, "ff_proj")] == (3, 13)
    rows = torch.zeros(ids.shape, dtype=torch.bool)
    rows[0, :3] = rows[2, 5] = True
    model.hidden_states(ids, am, output_positions=rows)
    assert seen[(2, "ff_proj")] == (4,) and seen[(2, "q_proj")] == (3, 13)


@pytest.mark.parametrize("positions,exc,match", [
    (slice(0, 8, 2), ValueError, "step 1"),
    ([1, 2], TypeError, "output_positions must be None, a slice"),
    (torch.zeros(3, 2, dtype=torch.int32), ValueError, r"output_positions must be a \[B, n\].*int32"),
    (torch.zeros(2, 2, dtype=torch.long), ValueError, r"\[B, n\] = \[3, n\].*shape \[2, 2\]"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"shape \[3\]"),
    (torch.tensor([[0], [13], [1]]), ValueError, r"holds 13, outside the positions \[0, 13\)"),
    (torch.tensor([[0], [-1], [1]]), ValueError, "holds -1"),
    (torch.zeros(3, 12, dtype=torch.bool), ValueError, r"bool mask must have the shape of input_ids \[3, 13\]"),
    (torch.zeros(3, 13, dtype=torch.bool, device="meta"), ValueError, "output_positions is on meta"),
])
def test_output_positions_bad_input(positions, exc, match):
    model = tiny_model()
    ids, am = _padded_ids()
    with pytest.raises(exc, match=match):
        model.hidden_states(ids, am, output_positions=positions)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, V, (2, 8))
    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=3).train()
        model.gradient_checkpointing = ckpt
        model(ids).logits.square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [V, 10_000, -1])
def test_ids_outside_the_vocabulary_are_named(bad):
    """An id outside [0, embedding_size) is a ValueError naming input_ids (it was a bare
    IndexError from the embedding)."""
    model = tiny_model()
    ids = torch.randint(0, V, (2, 6))
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=rf"LLaDAModel: input_ids holds {bad}, outside the vocabulary \[0, 64\)"):
        model(ids)
    with pytest.raises(ValueError, match="input_ids holds"):
        model.hidden_states(ids, output_positions=slice(0, 2))
    with pytest.raises(TypeError, match=r"input_ids must be a \[B, L\] int64 tensor; got float32"):
        model(ids.float())
    with pytest.raises(TypeError, match=r"input_ids must be a \[B, L\] int64 tensor; got int64 tensor of shape \[12\]"):
        model(ids.flatten())


def test_device_and_dtype_properties():
    model = tiny_model()
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32


def test_released_8b_shapes_on_meta():
    """The released config builds the 8B model's shapes (on the meta device: no memory)."""
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig.from_dict(RELEASED_CONFIG))
    n = sum(p.numel() for p in model.parameters())
    assert math.isclose(n / 1e9, 8.02, rel_tol=0.01)
    assert model.state_dict()["model.transformer.ff_out.weight"].shape == (126464, 4096)
