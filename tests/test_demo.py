"""The end-to-end demo (short version) and the `llada-kernels` command line."""

import sys
import types

import pytest
import torch

from llada_kernels import cli, demo
from llada_kernels.model import LLaDAConfig, LLaDAModel


@pytest.mark.slow
def test_quick_demo_learns_and_samples_with_every_mode():
    lines = []
    results = demo.run(demo.DemoConfig.quick(), log=lines.append)
    chance = 10.0 ** -demo.DemoConfig.quick().digits
    for mode in ("low_confidence", "random", "threshold 0.9", "low_confidence + prefix cache",
                 "low_confidence, eager reference"):
        assert results[mode]["accuracy"] >= 0.5, (mode, results[mode], lines)
        assert results[mode]["accuracy"] > 1000 * chance
    # Our sampler and LLaDA's generate() give the same tokens, and the demo says so only then.
    assert torch.equal(results["low_confidence"]["tokens"],
                       results["low_confidence, eager reference"]["tokens"])
    assert results["rows_differing_from_reference"] == 0
    assert any("identical tokens in all" in line for line in lines)
    # Threshold decoding needs fewer model calls than one per token.
    assert results["threshold 0.9"]["model_calls_per_batch"] < results["low_confidence"]["model_calls_per_batch"]
    assert any("exact match" in line for line in lines)


def test_demo_task_is_reversal():
    cfg = demo.DemoConfig.quick()
    prompt, answer = demo.make_batch(cfg, 5, torch.Generator().manual_seed(0))
    assert prompt.shape == (5, cfg.digits + 1) and (prompt[:, -1] == demo.SEP).all()
    assert torch.equal(answer[:, :cfg.digits], prompt[:, :cfg.digits].flip(1))
    assert (answer[:, cfg.digits:] == demo.EOS).all()


class CharTokenizer:
    """A stand-in for tokenizers.Tokenizer: one id per character."""

    def __init__(self, vocab):
        self.vocab = vocab

    @classmethod
    def from_file(cls, path):
        return cls("abcdefghijklmnop")

    def encode(self, text, add_special_tokens=True):
        return types.SimpleNamespace(ids=[self.vocab.index(c) for c in text])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.vocab[i] for i in ids if i < len(self.vocab))


def test_cli_generate_runs_a_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    model = LLaDAModel(LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=32,
                                   vocab_size=20, embedding_size=20, max_sequence_length=32,
                                   mask_token_id=19, eos_token_id=18, pad_token_id=18))
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=CharTokenizer))
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "abc", "--prompt", "hello",
                     "--steps", "4", "--gen-length", "8", "--block-length", "4"]) == 0
    out = capsys.readouterr().out.split("-" * 40)
    assert len(out) == 3 and all(len(o.strip()) <= 8 for o in out)


def test_cli_generate_without_tokenizers_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
    with pytest.raises(SystemExit, match="pip install tokenizers"):
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "hi"])


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    assert "demo" in capsys.readouterr().err



@pytest.mark.slow
def test_quick_block_diffusion_demo_learns_and_the_cache_is_exact():
    """The 2L objective trains the tiny block-diffusion model; the block sampler, with and
    without the exact cache, gets the same accuracy in the same model calls."""
    from llada_kernels import demo_block

    lines = []
    r = demo_block.run(demo_block.quick(), log=lines.append)
    for mode in ("top-k, exact KV cache", "top-k, no cache", "threshold 0.9, exact KV cache"):
        assert r[mode]["accuracy"] >= 0.5, (mode, r[mode], lines)
    for a, b in (("top-k, exact KV cache", "top-k, no cache"),
                 ("threshold 0.9, exact KV cache", "threshold 0.9, no cache")):
        assert r[a]["accuracy"] == r[b]["accuracy"]
        assert r[a]["calls_per_block"] == r[b]["calls_per_block"]
    assert r["threshold 0.9, exact KV cache"]["calls_per_block"] < r["top-k, exact KV cache"]["calls_per_block"]
    assert any("tokens/s" in line for line in lines)


def test_cli_demo_block_diffusion_flag(monkeypatch):
    from llada_kernels import demo_block

    seen = []
    monkeypatch.setattr(demo_block, "run", lambda cfg: seen.append(cfg))
    assert cli.main(["demo", "--block-diffusion", "--quick", "--seed", "3"]) == 0
    assert seen[0].seed == 3 and seen[0] == demo_block.quick().__class__(**{**vars(demo_block.quick()), "seed": 3})
