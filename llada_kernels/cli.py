"""The `llada-kernels` console script.

    llada-kernels demo [--block-diffusion] [--quick] [--seed N]
        Train a tiny LLaDA from scratch on the CPU and sample from it (llada_kernels.demo);
        with --block-diffusion a block-diffusion one (llada_kernels.demo_block).

    llada-kernels generate --model DIR --prompt TEXT [--chat] [--steps ...]
        Run a released checkpoint (config.json, safetensors, tokenizer.json) on GPU or CPU.
        Reading tokenizer.json needs the `tokenizers` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# LLaDA-8B-Instruct's chat template, for one user turn.
CHAT = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _demo(args):
    from . import demo, demo_block
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.block_diffusion:
        cfg = demo_block.quick() if args.quick else demo_block.full()
        cfg.seed = args.seed
        demo_block.run(cfg)
        return 0
    cfg = demo.DemoConfig.quick() if args.quick else demo.DemoConfig()
    cfg.seed = args.seed
    demo.run(cfg)
    return 0


def load_tokenizer(model_dir: Path):
    path = model_dir / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SystemExit("llada-kernels generate: reading tokenizer.json needs the `tokenizers` "
                         "package: pip install tokenizers") from None
    if not path.exists():
        raise SystemExit(f"llada-kernels generate: {path} does not exist")
    return Tokenizer.from_file(str(path))


def _generate(args):
    from .checkpoint import CheckpointError
    from .generate import generate
    from .model import LLaDAModel

    model_dir = Path(args.model)
    tok = load_tokenizer(model_dir)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    try:
        model = LLaDAModel.from_pretrained(model_dir, dtype=dtype, device=device)
    except CheckpointError as e:
        raise SystemExit(f"llada-kernels generate: {e}") from None
    cfg = model.config
    texts = [CHAT.format(prompt=p) if args.chat else p for p in args.prompt]
    encoded = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    width = max(len(e) for e in encoded)
    prompt = torch.full((len(encoded), width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for i, e in enumerate(encoded):  # left padding, as LLaDA's generate() expects
        prompt[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    out = generate(model, prompt.to(device), mask.to(device), steps=args.steps,
                   gen_length=args.gen_length, block_length=args.block_length,
                   temperature=args.temperature, remasking=args.remasking,
                   threshold=args.threshold, stop_at_eos=True, progress=True)  # ids: the config's
    for row in out[:, width:].tolist():
        print(tok.decode(row, skip_special_tokens=True))
        print("-" * 40)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llada-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a tiny LLaDA on CPU and sample from it")
    d.add_argument("--quick", action="store_true", help="the short version (under a minute)")
    d.add_argument("--block-diffusion", action="store_true",
                   help="a block-diffusion model (LLaDA2-style): the 2L objective, then the "
                        "block sampler with and without the exact KV cache")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 avoids oversubscription on a busy machine)")
    d.set_defaults(func=_demo)

    g = sub.add_parser("generate", help="sample from a released checkpoint")
    g.add_argument("--model", required=True, help="folder with config.json, safetensors, tokenizer.json")
    g.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the Instruct chat template")
    g.add_argument("--steps", type=int, default=128)
    g.add_argument("--gen-length", type=int, default=128)
    g.add_argument("--block-length", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--remasking", default="low_confidence",
                   choices=["low_confidence", "random", "margin", "entropy"])
    g.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel decoding")
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default: float32 on cpu, bfloat16 elsewhere")
    g.set_defaults(func=_generate)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
