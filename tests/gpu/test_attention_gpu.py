"""Attention on CUDA tensors: the Triton and CUDA C++ backends against the reference, forward
and backward, for every mask kind, dtype and head dimension each backend supports, with
grouped KV heads, odd lengths, Lq != Lk, strided layouts and offsets past 2^31.

Accuracy is FlashAttention's rule (gpu_common.assert_as_accurate): the truth is the reference
in fp64 and "eager" the reference in the kernel's dtype, both on the GPU.

To add a mask: one entry in MASKS, a function (B, Lq, Lk, generator) -> the keyword arguments
of the attention call that build it (e.g. {"block_size": 32}); every backend, dtype and head
dimension then runs it. The supported dtypes and head dimensions are read from
llada_kernels.ops.attention.SUPPORTED, so they follow the library.
"""

import pytest
import torch

import llada_kernels as lk
from llada_kernels.ops import attention as attention_ops

import gpu_common
from gpu_common import BIG_MEMORY, GPU, assert_as_accurate

pytestmark = GPU

# The public op: `attention` (structured masks) where it exists, else its former name.
ATTENTION = getattr(lk, "attention", None) or lk.bidirectional_attention
BACKENDS = ["triton", "cuda"]
FLOOR = {torch.float16: 2e-4, torch.bfloat16: 2e-3}


def _padding(keep):
    return {"key_padding_mask": keep}


def _some(B, Lq, Lk, g):
    keep = torch.rand(B, Lk, device=gpu_common.DEVICE, generator=g) < 0.7
    keep[:, 0] = True
    return _padding(keep)


def _empty_row(B, Lq, Lk, g):  # batch row 0 sees no key: zeros out, zero gradients
    keep = _some(B, Lq, Lk, g)["key_padding_mask"]
    keep[0] = False
    return _padding(keep)


def _left_pad(B, Lq, Lk, g):  # batched prompts, left-padded to one length
    lens = torch.randint(1, Lk + 1, (B,), device=gpu_common.DEVICE, generator=g)
    return _padding(torch.arange(Lk, device=gpu_common.DEVICE) >= (Lk - lens)[:, None])


def _half_pad(B, Lq, Lk, g):  # whole key tiles of padding: the tile-skipping path
    return _padding((torch.arange(Lk, device=gpu_common.DEVICE) >= Lk // 2).expand(B, Lk).contiguous())


MASKS = {
    "none": lambda B, Lq, Lk, g: {},
    "all_keys": lambda B, Lq, Lk, g: _padding(torch.ones(B, Lk, dtype=torch.bool, device=gpu_common.DEVICE)),
    "some": _some,
    "empty_row": _empty_row,
    "left_pad": _left_pad,
    "half_pad": _half_pad,
}

# (B, Hq, Hkv, Lq, Lk): GQA 1, 2, 4 and 8, odd lengths, Lq = 1, Lq > Lk and Lq < Lk.
SHAPES = [(2, 4, 4, 77, 77), (1, 8, 2, 129, 300), (3, 4, 1, 1, 513), (2, 6, 3, 200, 65),
          (2, 8, 1, 64, 191)]


def _cases():
    out = []
    for backend in BACKENDS:
        dtypes, head_dims = attention_ops.SUPPORTED[backend]
        for dtype in dtypes:
            for D in head_dims:
                for i, mask in enumerate(MASKS):
                    shape = SHAPES[(i + D) % len(SHAPES)]
                    out.append(pytest.param(backend, dtype, D, mask, shape,
                                            id=f"{backend}-{str(dtype)[6:]}-d{D}-{mask}-"
                                               + "x".join(map(str, shape))))
    return out


def make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, layout="contiguous", seed=0):
    g = torch.Generator(gpu_common.DEVICE).manual_seed(seed)

    def t(H, L):
        if layout == "bshd":  # [B, L, H, D] storage seen as [B, H, L, D], as models hold it
            return torch.randn(B, L, H, D, device=gpu_common.DEVICE, generator=g).to(dtype).transpose(1, 2)
        if layout == "strided_d":  # no unit stride along D: the op must copy
            return torch.randn(B, H, L, 2 * D, device=gpu_common.DEVICE, generator=g).to(dtype)[..., ::2]
        x = torch.randn(B, H, L, D, device=gpu_common.DEVICE, generator=g).to(dtype)
        if layout == "offset":  # contiguous, but 2 bytes off 16-byte alignment
            y = torch.empty(x.numel() + 1, device=gpu_common.DEVICE, dtype=dtype)[1:].view(x.shape)
            return y.copy_(x)
        return x

    return t(Hq, Lq), t(Hkv, Lk), t(Hkv, Lk), g


def fwd_bwd(q, k, v, grad, mask_kw, **kw):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = ATTENTION(q, k, v, **mask_kw, **kw)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


def check(backend, shape, D, dtype, mask, layout="contiguous", seed=0):
    B, Hq, Hkv, Lq, Lk = shape
    q, k, v, g = make_inputs(B, Hq, Hkv, Lq, Lk, D, dtype, layout, seed)
    mask_kw = MASKS[mask](B, Lq, Lk, g)
    grad = torch.randn(B, Hq, Lq, D, device=gpu_common.DEVICE, generator=g).to(dtype)
    got = fwd_bwd(q, k, v, grad, mask_kw, backend=backend)
    eager = fwd_bwd(q, k, v, grad, mask_kw, backend="reference")
    truth = fwd_bwd(q.double(), k.double(), v.double(), grad.double(), mask_kw, backend="reference")
    for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, eager, truth):
        assert a.dtype == dtype and a.shape == t.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        assert_as_accurate(name, a, e, t, FLOOR[dtype])
    keep = mask_kw.get("key_padding_mask")
    if keep is not None:  # exact zeros where nothing is seen, and for padded keys' gradients
        empty = ~keep.any(-1)
        assert (got[0][empty] == 0).all() and (got[1][empty] == 0).all()
        padded = ~keep[:, None, :, None].expand_as(got[2])
        assert (got[2][padded] == 0).all() and (got[3][padded] == 0).all()
    return got


@pytest.mark.parametrize("backend, dtype, D, mask, shape", _cases())
def test_matches_reference(backend, dtype, D, mask, shape):
    check(backend, shape, D, dtype, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequences(backend):
    check(backend, (2, 16, 4, 1000, 4099), 128, torch.bfloat16, "left_pad")


@pytest.mark.parametrize("layout", ["bshd", "strided_d", "offset"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend, layout):
    check(backend, (2, 4, 2, 70, 129), 64, torch.bfloat16, "some", layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    """No atomics: two runs give the same bits."""
    shape, D = (2, 8, 2, 300, 700), 128
    first = check(backend, shape, D, torch.float16, "some")
    second = check(backend, shape, D, torch.float16, "some")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_heads_times_batch(backend):
    """B * Hq = 70,400 programs along one launch axis: past CUDA's 65,535 limit for grid y/z."""
    check(backend, (1100, 64, 8, 17, 33), 64, torch.bfloat16, "none")


@BIG_MEMORY
@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_beyond_int32(backend):
    """q, k, v, out and their gradients hold 2^31 + 2^24 elements each (4.3 GB of bf16): the last
    batch entries lie past 2^31. They are checked against the reference on their own."""
    B, H, L, D = 1032, 8, 2048, 128
    assert B * H * L * D > 2**31
    dtype = torch.bfloat16
    g = torch.Generator(gpu_common.DEVICE).manual_seed(0)
    q, k, v, grad = (torch.randn(B, H, L, D, device=gpu_common.DEVICE, generator=g, dtype=dtype)
                     for _ in range(4))
    got = fwd_bwd(q, k, v, grad, {}, backend=backend)
    for b in (0, B - 1):
        sl = slice(b, b + 1)
        eager = fwd_bwd(q[sl], k[sl], v[sl], grad[sl], {}, backend="reference")
        truth = fwd_bwd(q[sl].double(), k[sl].double(), v[sl].double(), grad[sl].double(), {},
                        backend="reference")
        for name, a, e, t in zip(("out", "dq", "dk", "dv"), got, eager, truth):
            assert_as_accurate(f"{name}[{b}]", a[sl], e, t, FLOOR[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for B, Lq, Lk in [(0, 5, 5), (2, 0, 5), (2, 5, 0)]:
        q, k, v, _ = make_inputs(B, 2, 1, Lq, Lk, 64, torch.bfloat16)
        out, dq, dk, dv = fwd_bwd(q, k, v, torch.ones_like(q), {}, backend=backend)
        assert out.shape == q.shape and (out == 0).all() and (dq == 0).all()
        assert dk.shape == k.shape and (dk == 0).all() and (dv == 0).all()
