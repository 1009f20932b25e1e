"""`llada-kernels generate`'s flags and errors (issue 12 item 9): every bad argument is one
line, `llada-kernels generate: error: ...`, exit status 2, no traceback; a summary line with
tokens/s and model calls; --chat refuses a tokenizer without the template's special tokens."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from llada_kernels import cli
from llada_kernels.model import LLaDAConfig, LLaDAModel

SPECIAL = list(cli.CHAT_SPECIAL)
WORDS = [chr(ord("a") + i) for i in range(16)] + ["user", "assistant", "<eos>", "<pad>"] + SPECIAL
MASK = len(WORDS)  # 24: the mask id is the last row of the embedding
ARGS = ["--steps", "4", "--gen-length", "8", "--block-length", "4"]


def tokenizer(words):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny checkpoint (no tokenizer.json, as save_pretrained writes) and two tokenizers:
    with the chat template's special tokens, and without."""
    path = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=32, vocab_size=MASK + 1,
                      embedding_size=MASK + 1, max_sequence_length=48, mask_token_id=MASK,
                      eos_token_id=18, pad_token_id=19)
    LLaDAModel(cfg).save_pretrained(path / "model")
    chat = tokenizer(WORDS)
    chat.add_special_tokens(SPECIAL)
    chat.save(str(path / "chat.json"))
    (path / "plain").mkdir()
    tokenizer(WORDS[:20]).save(str(path / "plain" / "tokenizer.json"))
    return path


def run(capsys, *argv):
    code = cli.main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def fails(capsys, *argv):
    """The error line of a refused command line (and that it is only that)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", *argv])
    out = capsys.readouterr()
    assert e.value.code == 2 and out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llada-kernels generate: error: "), out.err
    assert "Traceback" not in out.err
    return lines[0].removeprefix("llada-kernels generate: error: ")


def test_generate_with_every_flag_prints_a_summary(folder, capsys):
    code, out, err = run(capsys, "--model", str(folder / "model"), "--tokenizer",
                         str(folder / "plain"), "--prompt", "a b c", "--prompt", "d e", *ARGS,
                         "--seed", "3", "--temperature", "1.0", "--cfg-scale", "0.5",
                         "--threshold", "0.9", "--prefix-cache", "--backend", "cpu")
    assert code == 0 and len(out.split("-" * 40)) == 3
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("16 tokens (2 x 8) in ") and "tokens/s" in summary
    assert "model calls" in summary and "prefix KV cache approximate" in summary


def test_seed_makes_sampling_reproducible(folder, capsys):
    argv = ["--model", str(folder / "model"), "--tokenizer", str(folder / "plain" / "tokenizer.json"),
            "--prompt", "a b c d", *ARGS, "--temperature", "2.0", "--remasking", "random"]
    outs = [run(capsys, *argv, "--seed", s)[1] for s in ("1", "1", "2", "3", "4")]
    assert outs[0] == outs[1] and len(set(outs)) > 1


def test_chat_refuses_a_tokenizer_without_the_special_tokens(folder, capsys):
    msg = fails(capsys, "--model", str(folder / "model"), "--tokenizer", str(folder / "plain"),
                "--prompt", "a b", "--chat", *ARGS)
    assert msg.startswith("--chat: the tokenizer") and "lacks the chat template's special tokens" in msg
    assert all(t in msg for t in SPECIAL)
    code, out, _ = run(capsys, "--model", str(folder / "model"), "--tokenizer",
                       str(folder / "chat.json"), "--prompt", "a b", "--chat", *ARGS)
    assert code == 0 and out.count("-" * 40) == 1


@pytest.mark.parametrize("extra,expected", [
    (["--steps", "0"], "argument --steps: expected a positive integer; got 0"),
    (["--gen-length", "x"], "argument --gen-length: expected a positive integer; got 'x'"),
    (["--temperature", "nan"], "argument --temperature: expected a finite number >= 0.0; got nan"),
    (["--cfg-scale", "-1"], "argument --cfg-scale: expected a finite number >= 0.0; got -1"),
    (["--threshold", "inf"], "argument --threshold: expected a finite number; got inf"),
    (["--remasking", "top_p"], "argument --remasking: invalid choice: 'top_p'"),
    (["--backend", "fast"], "argument --backend: invalid choice: 'fast'"),
    (["--backend", "cuda"], "--backend cuda: not available for cpu tensors here; available: "),
    (["--device", "tpu"], "--device 'tpu' is not a device (cpu, cuda, cuda:N)"),
    (["--device", "meta"], "--device 'meta': expected cpu or cuda"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not a device"),
    (["--gen-length", "10"], "gen_length (10) must be a multiple of block_length (4)"),
    (["--steps", "3"], "steps (3) must be a multiple of the number of blocks"),
    (["--gen-length", "48", "--block-length", "4", "--steps", "12"],
     "exceeds the model's max_sequence_length (48)"),
])
def test_bad_arguments_are_one_line(folder, capsys, extra, expected):
    argv = ["--model", str(folder / "model"), "--tokenizer", str(folder / "plain"),
            "--prompt", "a b c", *ARGS, *extra]
    assert expected in fails(capsys, *argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(folder, capsys):
    msg = fails(capsys, "--model", str(folder / "model"), "--prompt", "a", "--device", "cuda")
    assert msg.startswith("--device cuda: torch sees no CUDA GPU on this machine")


def test_missing_files_are_one_line(folder, capsys):
    msg = fails(capsys, "--model", str(folder / "model"), "--prompt", "a", *ARGS)
    assert msg.endswith("tokenizer.json does not exist (our save_pretrained writes none: pass "
                        "--tokenizer FILE_OR_DIR)")
    assert fails(capsys, "--model", str(folder / "nowhere"), "--prompt", "a").startswith(
        f"--model {folder / 'nowhere'}: not a folder")
    assert "does not exist" in fails(capsys, "--model", str(folder / "model"), "--tokenizer",
                                     str(folder / "none.json"), "--prompt", "a")
    assert fails(capsys, "--model", str(folder / "plain"), "--tokenizer", str(folder / "plain"),
                 "--prompt", "a").startswith(f"--model {folder / 'plain'}: ")


def test_missing_required_flag_is_one_line(capsys):
    assert fails(capsys, "--prompt", "a") == "the following arguments are required: --model"
