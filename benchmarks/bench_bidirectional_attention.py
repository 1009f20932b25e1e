"""bidirectional_attention against eager math attention and SDPA, forward and forward+backward.

    python -m pytest benchmarks/bench_bidirectional_attention.py --benchmark-only \
        --benchmark-group-by=param:device,param:dtype,param:L,param:padded,param:mode -k "cpu"

Each group holds every provider at one shape, so the ratios are read within one run. Baselines:
"eager" is llada_kernels.reference (math attention, the inputs' dtype); "sdpa" is
F.scaled_dot_product_attention with the same boolean mask (whatever backend it picks: the
flash CPU kernel on CPU; on CUDA "sdpa_flash" forces the FlashAttention backend, which takes
no mask, so it runs unpadded only). On CUDA also the peers of benchmarks/_peers.py that import:
SDPA on cuDNN, FlexAttention, flash-attn. extra_info carries the attention TFLOP/s (4 B H Lq Lk D
forward, 2.5x that for forward+backward, padding not discounted).

Targets (see README): CPU forward >= 1.0x SDPA and >= 3x eager; GPU bf16 D=128 L=4096
>= SDPA's flash backend.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import llada_kernels as lk
from llada_kernels.reference import attention as reference

import _peers
from _common import iterations_for, machine

CPU_SHAPE = dict(B=1, H=4, D=64)     # 2 cores: small enough to finish, big enough to tile
GPU_SHAPE = dict(B=4, H=16, D=128)
LENGTHS = (512, 1024, 4096)


def _devices():
    out = [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        out += [("cuda", torch.bfloat16), ("cuda", torch.float16)]
    return out


def _providers(device):
    if device == "cpu":
        return ["ours", "sdpa", "eager"]
    return ["eager", "triton", "cuda", "sdpa", "sdpa_flash"] + _peers.attention_peers()


def make_inputs(device, dtype, L, padded, B, H, D, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device, dtype).requires_grad_(requires_grad)
               for _ in range(3))
    mask = None
    if padded:  # 10% of each row's keys padded, on the left as batched prompts are
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        mask[:, : L // 10] = False
    return q, k, v, mask


def attention_fn(provider, device):
    """fn(q, k, v, mask) -> out for one provider, or None where it cannot run."""
    if provider in ("ours", "triton", "cuda"):
        backend = {"ours": "cpu"}.get(provider, provider)
        if backend not in lk.available_backends("bidirectional_attention_fwd", device):
            return None
        return lambda q, k, v, m: lk.bidirectional_attention(q, k, v, m, backend=backend)
    if provider == "eager":
        return lambda q, k, v, m: reference.bidirectional_attention(q, k, v, m)
    if provider == "sdpa":
        return lambda q, k, v, m: F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if m is None else m[:, None, None, :])
    if provider == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run(q, k, v, m):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)
        return run
    if provider in _peers.ATTENTION:
        return _peers.ATTENTION[provider]
    raise KeyError(provider)


CASES = [(device, dtype, provider) for device, dtype in _devices() for provider in _providers(device)]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("device,dtype,provider", CASES,
                         ids=[f"{d}-{str(t).removeprefix('torch.')}-{p}" for d, t, p in CASES])
def test_bidirectional_attention(benchmark, device, dtype, provider, L, padded, mode):
    fn = attention_fn(provider, device)
    if fn is None:
        pytest.skip(f"{provider} cannot run on {device} here")
    if provider == "flex" and L != LENGTHS[-1]:
        pytest.skip("FlexAttention compiles per shape: measured at the longest length only")
    if padded and provider in ("sdpa_flash", *_peers.ATTENTION_NO_MASK):
        pytest.skip(f"{provider} takes no key-padding mask")
    shape = CPU_SHAPE if device == "cpu" else GPU_SHAPE
    q, k, v, mask = make_inputs(device, dtype, L, padded, **shape, requires_grad=mode == "fwd_bwd")
    grad = torch.randn_like(q)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        out = fn(q, k, v, mask)
        if mode == "fwd_bwd":
            torch.autograd.grad(out, (q, k, v), grad)
        sync()

    B, H, D = shape["B"], shape["H"], shape["D"]
    flops = 4 * B * H * L * L * D * (2.5 if mode == "fwd_bwd" else 1.0)
    rounds = 3 if device == "cpu" and L >= 4096 else 10
    start = time.perf_counter()
    try:
        step()
    except (RuntimeError, ValueError) as e:  # a peer without a kernel for this case
        if provider not in _peers.ATTENTION:
            raise
        pytest.skip(f"{provider} cannot run this case: {str(e).splitlines()[0]}")
    benchmark.group = f"attention {device} {str(dtype).removeprefix('torch.')} L={L} padded={padded} {mode}"
    benchmark.pedantic(step, rounds=rounds, iterations=iterations_for(time.perf_counter() - start),
                       warmup_rounds=1)
    benchmark.extra_info.update(
        op=f"bidirectional_attention[{mode}{', padded' if padded else ''}]", provider=provider,
        device=device, dtype=str(dtype).removeprefix("torch."), flops=flops,
        tflops=flops / benchmark.stats.stats.median / 1e12, shape=f"B={B} H={H} L={L} D={D}",
        machine=machine(torch.device(device)))
