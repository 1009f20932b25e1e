"""`llada-kernels generate --model DIR` with a real tokenizer.json, read by the `tokenizers`
package, on a tiny checkpoint in the released format."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from llada_kernels import cli
from llada_kernels.generate import generate
from llada_kernels.model import LLaDAConfig, LLaDAModel

WORDS = [chr(ord("a") + i) for i in range(17)] + ["<eos>", "<pad>", "<mask>"]  # 20 ids


def write_checkpoint(path):
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=32, vocab_size=20,
                      embedding_size=20, max_sequence_length=32, mask_token_id=19,
                      eos_token_id=17, pad_token_id=18)
    LLaDAModel(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return tok


def test_generate_cli_reads_tokenizer_json(tmp_path, capsys):
    tok = write_checkpoint(tmp_path)
    prompts = ["a b c", "d e f g h"]
    args = ["--steps", "4", "--gen-length", "8", "--block-length", "4"]
    assert cli.main(["generate", "--model", str(tmp_path), *sum((["--prompt", p] for p in prompts), []),
                     *args]) == 0
    printed = [s.strip() for s in capsys.readouterr().out.split("-" * 40)][:-1]

    # The same call through the API, with the prompts left-padded as the CLI does.
    model = LLaDAModel.from_pretrained(tmp_path)
    ids = [tok.encode(p, add_special_tokens=False).ids for p in prompts]
    assert ids[0] == [0, 1, 2]
    width = max(map(len, ids))
    prompt = torch.tensor([[18] * (width - len(i)) + i for i in ids])
    mask = (torch.arange(width) >= torch.tensor([width - len(i) for i in ids])[:, None]).long()
    out = generate(model, prompt, mask, steps=4, gen_length=8, block_length=4, mask_id=19,
                   eos_id=17, stop_at_eos=True)
    expected = [tok.decode(row, skip_special_tokens=True).strip() for row in out[:, width:].tolist()]
    assert printed == expected and len(printed) == 2
