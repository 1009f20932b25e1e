"""remask_step against LLaDA's eager step (llada_kernels.reference.llada_official), at the
released model's vocabulary (V = 126464) with bf16 logits, as a bf16 model produces them.

Two scenarios:
  all_masked   every position is a candidate (block_end = L): the worst case for our kernels,
               which skip non-candidates; the issue's targets are judged here.
  last_block   the semi-autoregressive sampler's usual step: only the current 32-token block
               is masked, so our kernels touch 32 rows per sequence while eager reads all L.
"""

import pytest
import torch

import llada_kernels
from llada_kernels.constants import MASK_ID, VOCAB_SIZE as V
from llada_kernels.reference.llada_official import official_step

from _common import devices, measure

SHAPES = [(1, 256), (8, 256), (1, 1024), (8, 1024)]  # (B, L)
BLOCK = 32


def inputs(B, L, device, scenario, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(B, L, V, generator=g, device=device) * 3).to(dtype) \
        if device.type == "cuda" else _cpu_randn(B, L, dtype)
    x = torch.randint(0, MASK_ID, (B, L), device=device, generator=g)
    start = 0 if scenario == "all_masked" else L - BLOCK
    x[:, start:] = MASK_ID
    k = torch.full((B,), max(1, (L - start) // 8), dtype=torch.int64, device=device)
    return logits, x, k, L


def _cpu_randn(B, L, dtype):
    """bf16 noise without an fp32 copy of B*L*V (8 GB at the largest shape)."""
    out = torch.empty(B, L, V, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for b in range(B):
        for s in range(0, L, 64):
            out[b, s:s + 64] = (torch.randn(min(64, L - s), V, generator=g) * 3).to(dtype)
    return out


def providers(device):
    out = ["eager"]
    for name in ("cpu", "triton", "cuda"):
        if name in llada_kernels.available_backends("remask_step", device) and \
                not (name == "triton" and device.type == "cpu"):  # the interpreter is no benchmark
            out.append(name)
    return out


@pytest.mark.parametrize("scenario", ["all_masked", "last_block"])
@pytest.mark.parametrize("B,L", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("provider", ["eager", "cpu", "triton", "cuda"])
def test_remask_step(benchmark, provider, device, B, L, scenario):
    if provider not in providers(device):
        pytest.skip(f"{provider} does not run on {device.type} here")
    logits, x, k, block_end = inputs(B, L, device, scenario)
    if provider == "eager":
        k_list = k.tolist()

        def fn():
            return official_step(logits, x, k_list, mask_id=MASK_ID, block_end=block_end)
    else:
        def fn():
            return llada_kernels.remask_step(logits, x, k, mask_id=MASK_ID, backend=provider)
    measure(benchmark, fn, op=f"remask_step[{scenario}]", provider=provider, shape=f"B={B} L={L} V={V}",
            dtype=logits.dtype, device=device, bytes=logits.numel() * logits.element_size())
    del logits
