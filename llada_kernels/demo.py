"""The end-to-end demo: a tiny LLaDA learns to reverse digit strings on the CPU, then samples.

    llada-kernels demo            # a few minutes
    llada-kernels demo --quick    # well under a minute (what the test suite runs)

The task needs bidirectional context: the i-th answer digit is the (n-1-i)-th prompt digit, and
the sampler decodes answer positions in whatever order it is confident about.

    prompt  3 1 4 1 5 9 >           answer  9 5 1 4 1 3 <eos> <eos>

Pipeline: pre-training on whole sequences (pretrain_loss), then SFT on prompt/answer pairs
(sft_loss), both on the fused linear loss; then exact-match accuracy on held-out strings with
low_confidence, random and threshold decoding, the prefix KV cache, and the same model on the
eager reference path (LLaDA's own generate() transcribed, every op eager) for timing.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch

from . import training
from .generate import generate
from .model import LLaDAConfig, LLaDAModel
from .reference.llada_official import official_generate

SEP, EOS, MASK = 10, 11, 12  # digits are ids 0..9


@dataclass
class DemoConfig:
    digits: int = 6            # n: the string length; chance exact-match is 10^-n
    gen_length: int = 8        # n digits, EOS, EOS padding
    block_length: int = 4
    d_model: int = 96
    n_layers: int = 2
    n_heads: int = 4
    batch_size: int = 64
    pretrain_steps: int = 200
    sft_steps: int = 700
    lr: float = 3e-3
    eval_examples: int = 256
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(digits=4, gen_length=6, block_length=3, d_model=64, n_layers=2,
                   pretrain_steps=40, sft_steps=260, eval_examples=64)


def make_batch(cfg: DemoConfig, B: int, generator: torch.Generator):
    """prompt [B, n + 1] (digits then SEP), answer [B, gen_length] (reversed digits, EOS...)."""
    digits = torch.randint(0, 10, (B, cfg.digits), generator=generator)
    prompt = torch.cat([digits, torch.full((B, 1), SEP)], 1)
    answer = torch.full((B, cfg.gen_length), EOS)
    answer[:, :cfg.digits] = digits.flip(1)
    return prompt, answer


def build_model(cfg: DemoConfig) -> LLaDAModel:
    torch.manual_seed(cfg.seed)
    L = cfg.digits + 1 + cfg.gen_length
    return LLaDAModel(LLaDAConfig(
        d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads // 2, n_layers=cfg.n_layers,
        mlp_hidden_size=cfg.d_model * 3, vocab_size=13, embedding_size=16, max_sequence_length=L,
        rope_theta=10000.0, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS))


def _progress(n, desc, log):
    """tqdm when installed, else a line of text every ~10%."""
    try:
        from tqdm.auto import tqdm
        return tqdm(total=n, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        return _TextBar(n, desc, log)


class _TextBar:
    def __init__(self, n, desc, log):
        self.n, self.desc, self.log, self.i, self.postfix = n, desc, log, 0, ""

    def update(self, k=1):
        self.i += k
        if self.i == self.n or self.i % max(1, self.n // 10) == 0:
            self.log(f"  {self.desc}: {self.i}/{self.n} {self.postfix}")

    def set_postfix_str(self, s):
        self.postfix = s

    def close(self):
        pass


def _optimizer(model, cfg: DemoConfig, total: int):
    """AdamW with a 50-step warm-up and a cosine decay over `total` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return opt, sched


def _step(loss, model, opt, sched, bar, step: int):
    """One optimiser step on `loss` (gradients clipped to norm 1), and the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    bar.update(1)
    if step % 25 == 0:
        bar.set_postfix_str(f"loss {loss.item():.3f}")


def train(model, cfg: DemoConfig, log=print):
    """Pre-training then SFT with AdamW and a cosine schedule. Returns seconds per step."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    total = cfg.pretrain_steps + cfg.sft_steps
    opt, sched = _optimizer(model, cfg, total)
    model.train()
    times = {}
    for phase, steps in (("pre-train", cfg.pretrain_steps), ("SFT", cfg.sft_steps)):
        bar = _progress(steps, phase, log)
        start = time.perf_counter()
        for step in range(steps):
            prompt, answer = make_batch(cfg, cfg.batch_size, g)
            ids = torch.cat([prompt, answer], 1)
            if phase == "pre-train":
                loss = training.pretrain_loss(model, ids, generator=g)
            else:
                lengths = torch.full((cfg.batch_size,), prompt.shape[1])
                loss = training.sft_loss(model, ids, lengths, generator=g)
            _step(loss, model, opt, sched, bar, step)
        bar.close()
        times[phase] = (time.perf_counter() - start) / max(1, steps)
        log(f"{phase}: {steps} steps, {1e3 * times[phase]:.1f} ms/step, last loss {loss.item():.3f}")
    model.eval()
    return times


def evaluate(model, cfg: DemoConfig, *, reference=False, batch=64, **kwargs):
    """Exact-match accuracy of the digits on held-out strings, seconds, model calls, and the
    generated tokens [N, gen_length]."""
    g = torch.Generator().manual_seed(10_000 + cfg.seed)  # disjoint from the training stream
    prompt, answer = make_batch(cfg, cfg.eval_examples, g)
    steps = kwargs.pop("steps", cfg.gen_length)
    args = dict(steps=steps, gen_length=cfg.gen_length, block_length=cfg.block_length, mask_id=MASK)
    correct, calls, tokens = 0, 0, []
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for i in range(0, cfg.eval_examples, batch):
        p = prompt[i:i + batch]
        if reference:
            torch.manual_seed(cfg.seed)
            out = official_generate(model, p, eos_id=EOS, **args, **kwargs)
            calls += steps
        else:
            out, stats = generate(model, p, eos_id=EOS, generator=gen, return_stats=True, **args, **kwargs)
            calls += stats.model_calls
        tokens.append(out[:, p.shape[1]:])
        got = out[:, p.shape[1]:p.shape[1] + cfg.digits]
        correct += int((got == answer[i:i + batch, :cfg.digits]).all(1).sum())
    seconds = time.perf_counter() - start
    return (correct / cfg.eval_examples, seconds, calls / math.ceil(cfg.eval_examples / batch),
            torch.cat(tokens))


def run(cfg: DemoConfig | None = None, *, log=print) -> dict:
    """Train, sample, report. Returns the numbers it printed."""
    cfg = cfg or DemoConfig()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    log(f"Task: reverse {cfg.digits} digits (chance exact match 1e-{cfg.digits}). "
        f"Model: {n / 1e3:.0f}k parameters, {cfg.n_layers} layers, d_model {cfg.d_model}.")
    results = {"train_s_per_step": train(model, cfg, log)}

    modes = {
        "low_confidence": dict(remasking="low_confidence"),
        "random": dict(remasking="random"),
        "threshold 0.9": dict(remasking="low_confidence", threshold=0.9),
        "low_confidence + prefix cache": dict(remasking="low_confidence", prefix_cache=True),
        "low_confidence, eager reference": dict(remasking="low_confidence", reference=True),
    }
    log(f"\n{'decoding':34s} {'exact match':>11s} {'model calls':>11s} {'time':>8s}")
    for name, kw in modes.items():
        reference = kw.pop("reference", False)
        if reference:
            model.backend = "reference"
        acc, seconds, calls, tokens = evaluate(model, cfg, reference=reference, **kw)
        model.backend = None
        results[name] = dict(accuracy=acc, seconds=seconds, model_calls_per_batch=calls,
                             tokens=tokens)
        log(f"{name:34s} {100 * acc:10.1f}% {calls:11.1f} {seconds:7.2f}s")
    ours, ref = results["low_confidence"], results["low_confidence, eager reference"]
    differ = int((ours["tokens"] != ref["tokens"]).any(1).sum())
    results["rows_differing_from_reference"] = differ
    same = ("identical tokens in all" if differ == 0
            else f"tokens differ in {differ} of the") + f" {len(ours['tokens'])} sequences"
    log(f"\nSampling speed-up over the eager reference path: {ref['seconds'] / ours['seconds']:.2f}x "
        f"({same}, compared token by token).")
    cache = results["low_confidence + prefix cache"]
    log(f"Prefix KV cache (approximate): {100 * (cache['accuracy'] - ours['accuracy']):+.1f} points "
        "of exact match against no cache.")
    return results
