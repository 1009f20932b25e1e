"""The block-diffusion demo: a tiny block-diffusion model (LLaDA2-style, block-causal
attention) learns to reverse digit strings on the CPU, then samples block by block.

    llada-kernels demo --block-diffusion            # a few minutes
    llada-kernels demo --block-diffusion --quick    # well under a minute (the test suite's)

Training: the 2L objective (training.block_diffusion_loss: [x_t ; x_0] under the 2L mask,
the fused loss on x_t's masked answer positions, complementary masking). Sampling:
block_generate with the exact KV cache, then without it (the whole window recomputed every
step), then threshold decoding; each reports exact-match accuracy, model calls per block and
tokens per second. The same task as `llada-kernels demo` (see demo.py).
"""

from __future__ import annotations

import time

import torch

from . import training
from .block_generate import block_generate
from .demo import EOS, MASK, SEP, DemoConfig, _optimizer, _progress, _step, make_batch
from .model import LLaDAConfig, LLaDAModel


def quick() -> DemoConfig:
    return DemoConfig(digits=4, gen_length=6, block_length=3, d_model=64, n_layers=2,
                      batch_size=24, pretrain_steps=0, sft_steps=200, eval_examples=64)


def full() -> DemoConfig:
    return DemoConfig(block_length=4, batch_size=48, pretrain_steps=0, sft_steps=900)


def build_model(cfg: DemoConfig) -> LLaDAModel:
    torch.manual_seed(cfg.seed)
    L = cfg.digits + 1 + cfg.gen_length
    T = -(-L // cfg.block_length) * cfg.block_length
    return LLaDAModel(LLaDAConfig(
        d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads // 2,
        n_layers=cfg.n_layers, mlp_hidden_size=cfg.d_model * 3, vocab_size=13,
        embedding_size=16, max_sequence_length=T, rope_theta=10000.0, mask_token_id=MASK,
        eos_token_id=EOS, pad_token_id=EOS, block_size=cfg.block_length))


def train(model, cfg: DemoConfig, log=print) -> float:
    """The block-diffusion objective on prompt/answer pairs (the prompt is never masked),
    AdamW with warm-up and a cosine schedule. Returns seconds per step."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    steps = cfg.sft_steps
    opt, sched = _optimizer(model, cfg, steps)
    model.train()
    bar = _progress(steps, "block-diffusion training", log)
    start = time.perf_counter()
    for step in range(steps):
        prompt, answer = make_batch(cfg, cfg.batch_size, g)
        ids = torch.cat([prompt, answer], 1)
        maskable = torch.zeros_like(ids, dtype=torch.bool)
        maskable[:, prompt.shape[1]:] = True
        loss = training.block_diffusion_loss(model, ids, maskable=maskable, noise_range=(0.1, 1.0),
                                             complementary=True, generator=g)
        _step(loss, model, opt, sched, bar, step)
    bar.close()
    seconds = (time.perf_counter() - start) / max(1, steps)
    log(f"training: {steps} steps, {1e3 * seconds:.1f} ms/step, last loss {loss.item():.3f}")
    model.eval()
    return seconds


def evaluate(model, cfg: DemoConfig, *, batch=64, **kwargs) -> dict:
    """Exact-match accuracy on held-out strings, model calls per block, tokens/s."""
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    prompt, answer = make_batch(cfg, cfg.eval_examples, g)
    correct, calls, blocks = 0, 0, 0
    start = time.perf_counter()
    for i in range(0, cfg.eval_examples, batch):
        p = prompt[i:i + batch]
        out, stats = block_generate(model, p, gen_length=cfg.gen_length, return_stats=True,
                                    **kwargs)
        got = out[:, p.shape[1]:p.shape[1] + cfg.digits]
        correct += int((got == answer[i:i + batch, :cfg.digits]).all(1).sum())
        calls += stats.model_calls
        blocks += len(stats.calls_per_block)
    seconds = time.perf_counter() - start
    return dict(accuracy=correct / cfg.eval_examples, calls_per_block=calls / blocks,
                tokens_per_s=cfg.eval_examples * cfg.gen_length / seconds, seconds=seconds)


def run(cfg: DemoConfig | None = None, *, log=print) -> dict:
    """Train, sample, report. Returns the numbers it printed."""
    cfg = cfg or full()
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    log(f"Task: reverse {cfg.digits} digits (chance exact match 1e-{cfg.digits}). Block-diffusion "
        f"model: {n / 1e3:.0f}k parameters, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"blocks of {cfg.block_length}.")
    results = {"train_s_per_step": train(model, cfg, log)}
    steps = cfg.block_length
    modes = {
        "top-k, exact KV cache": dict(threshold=None, steps=steps),
        "top-k, no cache": dict(threshold=None, steps=steps, cache=None),
        "threshold 0.9, exact KV cache": dict(threshold=0.9, steps=steps),
        "threshold 0.9, no cache": dict(threshold=0.9, steps=steps, cache=None),
    }
    log(f"\n{'decoding':32s} {'exact match':>11s} {'calls/block':>11s} {'tokens/s':>9s}")
    for name, kw in modes.items():
        r = evaluate(model, cfg, **kw)
        results[name] = r
        log(f"{name:32s} {100 * r['accuracy']:10.1f}% {r['calls_per_block']:11.2f} "
            f"{r['tokens_per_s']:9.0f}")
    a, b = results["top-k, exact KV cache"], results["top-k, no cache"]
    log(f"\nThe exact cache: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x the tokens/s of "
        f"recomputing the window, the same tokens (accuracy {100 * a['accuracy']:.1f}% both "
        f"ways: {100 * b['accuracy']:.1f}%).")
    return results
