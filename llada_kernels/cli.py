"""The `llada-kernels` console script.

    llada-kernels demo [--block-diffusion] [--quick] [--seed N]
        Train a tiny LLaDA from scratch on the CPU and sample from it (llada_kernels.demo);
        with --block-diffusion a block-diffusion one (llada_kernels.demo_block).

    llada-kernels generate --model DIR --prompt TEXT [--tokenizer PATH] [--chat] [--steps N]
                           [--gen-length N] [--block-length N] [--temperature T] [--seed N]
                           [--cfg-scale S] [--remasking R] [--threshold P] [--prefix-cache]
                           [--backend B] [--device D] [--dtype T]
        Run a released checkpoint (config.json, safetensors; tokenizer.json there or at
        --tokenizer) on GPU or CPU, then print one summary line (tokens/s, model calls) to
        stderr. Reading tokenizer.json needs the `tokenizers` package. A bad argument is one
        line, `llada-kernels generate: error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# LLaDA-8B-Instruct's chat template, for one user turn, and the special tokens it uses.
CHAT = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
CHAT_SPECIAL = ("<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
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


class UsageError(Exception):
    """A bad argument: reported as one line, `llada-kernels <command>: error: ...`, exit 2."""


def load_tokenizer(model_dir: Path, tokenizer: str | None = None):
    """The tokenizer.json at --tokenizer (a file, or a folder holding one), else in the model's
    folder, read with the `tokenizers` package."""
    path = Path(tokenizer) if tokenizer else model_dir / "tokenizer.json"
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SystemExit("llada-kernels generate: reading tokenizer.json needs the `tokenizers` "
                         "package: pip install tokenizers") from None
    if not path.exists():
        hint = "" if tokenizer else " (our save_pretrained writes none: pass --tokenizer FILE_OR_DIR)"
        raise UsageError(f"{path} does not exist{hint}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers package raises its own Exception type
        raise UsageError(f"{path} is not a tokenizer.json the tokenizers package reads: {e}") from None


def check_chat_tokens(tok, path_hint: str):
    """--chat: the template's special tokens must each be one token of this tokenizer, else the
    model would see the template as ordinary text."""
    to_id = getattr(tok, "token_to_id", None)
    missing = [t for t in CHAT_SPECIAL if to_id is None or to_id(t) is None]
    if missing:
        raise UsageError(f"--chat: the tokenizer ({path_hint}) lacks the chat template's special "
                         f"tokens {', '.join(missing)}; use LLaDA-8B-Instruct's tokenizer, or drop --chat")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError(f"--device {name}: torch sees no CUDA GPU on this machine "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA GPU(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: expected cpu or cuda")
    return device


def _generate(args):
    import time

    import llada_kernels

    from .checkpoint import CheckpointError
    from .generate import generate
    from .model import LLaDAModel

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise UsageError(f"--model {model_dir}: not a folder (config.json and safetensors)")
    device = _device(args.device)
    if args.backend is not None:
        ok = llada_kernels.available_backends("remask_step", device)
        if args.backend not in ok:
            raise UsageError(f"--backend {args.backend}: not available for {device.type} tensors "
                             f"here; available: {', '.join(ok)}")
    tok = load_tokenizer(model_dir, args.tokenizer)
    if args.chat:
        check_chat_tokens(tok, args.tokenizer or str(model_dir / "tokenizer.json"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    try:
        model = LLaDAModel.from_pretrained(model_dir, dtype=dtype, device=device)
    except (CheckpointError, OSError) as e:
        raise UsageError(f"--model {model_dir}: {e}") from None
    model.backend = args.backend
    cfg = model.config
    texts = [CHAT.format(prompt=p) if args.chat else p for p in args.prompt]
    encoded = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    if not all(encoded):
        raise UsageError("--prompt: a prompt encodes to no token")
    width = max(len(e) for e in encoded)
    prompt = torch.full((len(encoded), width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for i, e in enumerate(encoded):  # left padding, as LLaDA's generate() expects
        prompt[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    generator = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        out, stats = generate(model, prompt.to(device), mask.to(device), steps=args.steps,
                              gen_length=args.gen_length, block_length=args.block_length,
                              temperature=args.temperature, cfg_scale=args.cfg_scale,
                              remasking=args.remasking, threshold=args.threshold,
                              prefix_cache=args.prefix_cache, stop_at_eos=True, progress=True,
                              generator=generator, backend=args.backend, return_stats=True)
    except (ValueError, TypeError) as e:
        if str(e).startswith("generate: "):  # an argument the sampler refuses
            raise UsageError(str(e).removeprefix("generate: ")) from None
        raise
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for row in out[:, width:].tolist():
        print(tok.decode(row, skip_special_tokens=True))
        print("-" * 40)
    tokens = out.shape[0] * args.gen_length
    print(f"{tokens} tokens ({out.shape[0]} x {args.gen_length}) in {seconds:.2f} s: "
          f"{tokens / seconds:.1f} tokens/s, {stats.model_calls} model calls "
          f"({stats.model_calls / len(stats.calls_per_block):.1f} per block"
          + (", the prefix KV cache approximate" if args.prefix_cache else "") + ")",
          file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with every error (its own and ours) one line: `prog: error: message`."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


def _finite_float(low=None):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) \
                or (low is not None and value < low):
            raise argparse.ArgumentTypeError(
                f"expected a finite number{f' >= {low}' if low is not None else ''}; got {text}")
        return value
    return parse


def main(argv=None) -> int:
    parser = _Parser(prog="llada-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    g.add_argument("--model", required=True, help="folder with config.json and safetensors")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, or a folder holding one (default: the model's folder)")
    g.add_argument("--prompt", required=True, action="append", help="repeat for a batch")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the Instruct chat template")
    g.add_argument("--steps", type=_positive_int, default=128)
    g.add_argument("--gen-length", type=_positive_int, default=128)
    g.add_argument("--block-length", type=_positive_int, default=32)
    g.add_argument("--temperature", type=_finite_float(0.0), default=0.0)
    g.add_argument("--cfg-scale", type=_finite_float(0.0), default=0.0,
                   help="classifier-free guidance scale (0: none)")
    g.add_argument("--remasking", default="low_confidence",
                   choices=["low_confidence", "random", "margin", "entropy"])
    g.add_argument("--threshold", type=_finite_float(), default=None, help="Fast-dLLM parallel decoding")
    g.add_argument("--prefix-cache", action="store_true",
                   help="Fast-dLLM's prefix KV cache (approximate: tokens may differ)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the sampling noise (temperature > 0, random remasking)")
    g.add_argument("--backend", default=None, choices=["reference", "cpu", "triton", "cuda"],
                   help="every op's backend (default: the device's)")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    g.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default: float32 on cpu, bfloat16 elsewhere")
    g.set_defaults(func=_generate)

    sub.metavar = "{" + ",".join(sub.choices) + "}"  # named in "arguments are required"
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        sub.choices[args.command].error(str(e))


if __name__ == "__main__":
    sys.exit(main())
