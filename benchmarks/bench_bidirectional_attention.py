"""attention (formerly bidirectional_attention) against eager math attention and SDPA, forward
and forward+backward: key padding (test_bidirectional_attention), and the structured masks of
llada_kernels.masks (test_masked_attention, below).

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
        if backend not in lk.available_backends("attention_fwd", device):
            return None
        return lambda q, k, v, m: lk.attention(q, k, v, key_padding_mask=m, backend=backend)
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


# ---- structured masks ---------------------------------------------------------------------
#
# Block-causal (b = 32) over L tokens, and the 2L block-diffusion training mask over
# [x_t ; x_0] of L tokens each (attention over 2L), at L = 1024 and 4096, forward and
# forward + backward. Providers: ours with the mask ("ours" on CPU, "triton" and "cuda" on a
# GPU), the same backend with the mask ignored ("<backend>_full": full attention over the same
# length), SDPA given the equivalent dense boolean mask ([B, 1, Lq, Lk], built once outside
# the timing and not counted in its peak memory), and FlexAttention (GPU, when importable)
# with a BlockMask built once from the same O(L) description. Peak extra memory is measured
# in one extra call (benchmarks/_common.py).
#
# Tiles each mask skips, per (batch row, head), at 64 x 64 tiles (the CUDA kernels' and the
# Triton forward's at D = 64; `python benchmarks/bench_bidirectional_attention.py --tiles`
# prints every kernel's counts):
#     block_causal  b=32, L=1024: 120 of 256 skipped, 120 full, 16 partial
#     block_causal  b=32, L=4096: 2016 of 4096 skipped, 2016 full, 64 partial
#     block_diffusion b=32, L=1024 (2L=2048): 720 of 1024 skipped, 240 full, 64 partial of
#         which 16 have no visible pair (skipped after the element test)
#     block_diffusion b=32, L=4096 (2L=8192): 12096 of 16384 skipped, 4032 full, 256 partial
#         (64 empty)
# so the ideal speedups over full attention are 1.9x (block-causal) and 3.6-3.9x (2L mask).

MASK_LENGTHS = (1024, 4096)
MASKS = ("block_causal", "block_diffusion")
BLOCK = 32


def build_mask(kind, L, device):
    """(mask, attention length): block-causal over L, or the 2L mask over [x_t ; x_0]."""
    if kind == "block_causal":
        return lk.masks.block_causal(BLOCK, seq_len=L, device=device), L
    return lk.masks.block_diffusion(BLOCK, L, device=device), 2 * L


def masked_fn(provider, device, mask):
    """fn(q, k, v) -> out for one provider with `mask`, or None where it cannot run."""
    backend = {"ours": "cpu", "ours_full": "cpu"}.get(provider, provider.removesuffix("_full"))
    if provider in ("sdpa", "flex"):
        dense = mask.to_dense()[:, None]
        if provider == "sdpa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            return None
        qm, km = mask.q_mask, mask.k_mask

        def mask_mod(b, h, qi, ki):
            return (qm[0, 0, qi] == km[0, 0, ki]) & (km[0, 1, ki] <= qm[0, 1, qi]) \
                & (qm[0, 1, qi] <= km[0, 2, ki])
        block_mask = create_block_mask(mask_mod, None, None, mask.q_len, mask.k_len, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    available = lk.available_backends("attention_fwd", device)
    if provider.endswith("_full"):
        if backend not in available:
            return None
        return lambda q, k, v: lk.attention(q, k, v, backend=backend)
    if backend not in available:
        return None
    return lambda q, k, v: lk.attention(q, k, v, mask, backend=backend)


def _mask_providers(device):
    return ["triton", "triton_full", "cuda", "cuda_full", "sdpa", "flex"]


# The CPU rows of these masks are bench_attention_masks_cpu.py's (one set of CPU rows, with the
# ISA the kernel ran with); this file's mask rows are the GPU ones.
MASK_CASES = [(device, dtype, provider) for device, dtype in _devices() if device != "cpu"
              for provider in _mask_providers(device)]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("L", MASK_LENGTHS)
@pytest.mark.parametrize("device,dtype,provider", MASK_CASES,
                         ids=[f"{d}-{str(t).removeprefix('torch.')}-{p}" for d, t, p in MASK_CASES])
def test_masked_attention(benchmark, device, dtype, provider, L, kind, mode):
    from _common import peak_extra_bytes

    mask, La = build_mask(kind, L, device)
    fn = masked_fn(provider, device, mask)
    if fn is None:
        pytest.skip(f"{provider} cannot run on {device} here")
    shape = CPU_SHAPE if device == "cpu" else GPU_SHAPE
    B, H, D = shape["B"], shape["H"], shape["D"]
    q, k, v, _ = make_inputs(device, dtype, La, False, **shape, requires_grad=mode == "fwd_bwd")
    grad = torch.randn_like(q)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        out = fn(q, k, v)
        if mode == "fwd_bwd":
            torch.autograd.grad(out, (q, k, v), grad)
        sync()

    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    peak = peak_extra_bytes(step, torch.device(device))
    label = "block_causal b=32" if kind == "block_causal" else "block_diffusion 2L b=32"
    length = f"L={L}" if kind == "block_causal" else f"L={L} (2L={La})"
    benchmark.group = f"attention {label} {device} {str(dtype).removeprefix('torch.')} {length} {mode}"
    rounds = 3 if device == "cpu" and La >= 4096 else 10
    benchmark.pedantic(step, rounds=rounds, iterations=iterations_for(elapsed), warmup_rounds=1)
    dense_flops = 4 * B * H * La * La * D * (2.5 if mode == "fwd_bwd" else 1.0)
    tiles = mask.tile_counts(64, 64)
    benchmark.extra_info.update(
        op=f"attention[{label}, {mode}]", provider=provider, device=device,
        dtype=str(dtype).removeprefix("torch."), flops=dense_flops,
        shape=f"B={B} H={H} {length} D={D}", peak_extra_bytes=peak,
        tiles_64x64=f"{tiles['skip']}/{tiles['total']} skipped, {tiles['full']} full, "
                    f"{tiles['partial']} partial ({tiles['empty']} of them empty)",
        machine=machine(torch.device(device)))


def print_tile_counts():
    """The tiles each benchmarked mask skips, at every kernel's tile sizes."""
    from llada_kernels.triton.attention import tile_sizes

    sizes = {"cuda (all kernels)": (64, 64)}
    for D in (64, 128):
        for kernel, (bm, bn) in tile_sizes(D).items():
            sizes[f"triton {kernel} D={D}"] = (bm, bn)
    for kind in MASKS:
        for L in MASK_LENGTHS:
            mask, La = build_mask(kind, L, "cpu")
            for name, (bm, bn) in sizes.items():
                c = mask.tile_counts(bm, bn)
                print(f"{kind:16} L={L:5} (attention over {La:5}) {name:19} {bm:3}x{bn:<3} "
                      f"skip {c['skip']:6} / {c['total']:6}  full {c['full']:6}  "
                      f"partial {c['partial']:5} (empty {c['empty']})")


if __name__ == "__main__":
    import sys

    if "--tiles" in sys.argv:
        print_tile_counts()
