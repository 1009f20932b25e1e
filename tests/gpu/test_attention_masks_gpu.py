"""Structured attention masks on CUDA tensors: the Triton and CUDA C++ kernels, forward and all
three gradients, against fp64 SDPA given the equivalent dense boolean mask (FlashAttention's 2x
rule), with the cases of tests/test_attention_masks.py plus larger ones (every kernel's tiles
skip, full and partial at once). Skipped without a GPU; run with tests/gpu/run.sh."""

import pytest
import torch

import llada_kernels as lk
from test_attention_masks import KERNEL_CASES, check_backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LARGE = [
    (32, 4, 2, 300, 300, 64, "block_causal_b32"),
    (37, 2, 1, 64, 1000, 128, "kv_cache"),
    (4, 8, 2, 1024, 1024, 128, "block_diffusion"),
    (4, 4, 4, 777, 777, 64, "block_causal_docs"),
    (2, 8, 1, 500, 500, 128, "documents_cu"),
    (3, 4, 2, 200, 200, 64, "empty_rows"),
    (2, 4, 2, 333, 1029, 64, "none"),
]
HEAD_DIMS = {"triton": (16, 32, 64, 128), "cuda": (64, 128)}


def _cases(backend):
    out = []
    for B, Hq, Hkv, Lq, Lk, D, kind in KERNEL_CASES + LARGE:
        D = D if D in HEAD_DIMS[backend] else 64
        out.append(pytest.param((B, Hq, Hkv, Lq, Lk, D), kind,
                                id=f"{kind}-{B}x{Hq}x{Hkv}x{Lq}x{Lk}x{D}"))
    return out


def _needs(backend):
    if backend not in lk.available_backends("attention_fwd", "cuda"):
        pytest.skip(f"the {backend} backend cannot run here")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,kind", _cases("triton"))
def test_triton(shape, kind, dtype):
    _needs("triton")
    check_backend("triton", "cuda", shape, kind, dtype, truth_device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,kind", _cases("cuda"))
def test_cuda(shape, kind, dtype):
    _needs("cuda")
    check_backend("cuda", "cuda", shape, kind, dtype, truth_device="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["bshd"])
def test_strided_inputs(backend, layout):
    _needs(backend)
    check_backend(backend, "cuda", (2, 4, 2, 200, 200, 64), "block_diffusion", torch.bfloat16,
                  layout=layout, truth_device="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape,kind", [((2, 4, 2, 200, 333, 64), "kv_cache"),
                                        ((3, 4, 2, 256, 256, 128), "block_diffusion"),
                                        ((3, 4, 2, 200, 200, 64), "empty_rows")],
                         ids=["kv_cache", "block_diffusion", "empty_rows"])
def test_lse_gradient_and_key_chunk_merge(backend, shape, kind):
    """return_lse's value and gradient (through the kernels' delta), then the keys split in
    two and merged (tests/test_attention_lse.py's check: fp64 truth, 2x rule)."""
    from test_attention_lse import check_lse, chunked

    _needs(backend)

    def whole(q, k, v, m):
        m = None if m is None else m.to("cuda")
        return lk.attention(q.cuda(), k.cuda(), v.cuda(), m, backend=backend, return_lse=True)

    def halves(q, k, v, m):
        return chunked(backend, (shape[4] // 2 + 1,))(q.cuda(), k.cuda(), v.cuda(), m.to("cuda"))

    for dtype in (torch.bfloat16, torch.float16):
        check_lse(whole, shape, kind, dtype)
        check_lse(halves, shape, kind, dtype)
