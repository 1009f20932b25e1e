"""masked_diffusion_loss on CUDA tensors: the triton and cuda backends against the reference, with
the CPU suite's tolerance rule, and rows past 2^31 elements. Skipped without a GPU."""

import pytest
import torch

import llada_kernels  # noqa: F401
from llada_kernels import fused_linear_masked_diffusion_loss, masked_diffusion_loss
from llada_kernels.reference import loss as ref

from gpu_common import BIG_MEMORY, GPU

pytestmark = GPU
BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(B, L, V, dtype, masked=0.5, scale=3.0, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    logits = (torch.randn(B, L, V, device="cuda", generator=g) * scale).to(dtype)
    targets = torch.randint(0, V, (B, L), device="cuda", generator=g)
    is_masked = torch.rand(B, L, device="cuda", generator=g) < masked
    p_mask = torch.rand(B, device="cuda", generator=g) * 0.9 + 0.1
    return logits, targets, is_masked, p_mask


def loss_and_grad(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kw)
    return loss.detach(), torch.autograd.grad(loss.sum(), x)[0]


def assert_as_accurate(out, eager, exact):
    err = (out.double() - exact.double()).abs().max().item()
    eager_err = (eager.double() - exact.double()).abs().max().item()
    floor = 2 * torch.finfo(out.dtype).eps * exact.double().abs().max().item()
    assert err <= 2 * eager_err + floor, (err, eager_err, floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 77), (1, 1, 5), (3, 64, 4099), (2, 16, 126464)])
@pytest.mark.parametrize("masked", [0.0, 0.5, 1.0])
def test_logits_form(backend, dtype, shape, masked):
    logits, targets, is_masked, p_mask = inputs(*shape, dtype, masked)
    out = loss_and_grad(masked_diffusion_loss, logits, targets, is_masked, p_mask, backend=backend)
    eager = loss_and_grad(ref.masked_diffusion_loss, logits, targets, is_masked, p_mask)
    exact = loss_and_grad(ref.masked_diffusion_loss, logits.double(), targets, is_masked, p_mask.double())
    for o, e, x in zip(out, eager, exact):
        assert_as_accurate(o, e, x)
    assert (out[1][~is_masked] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_form(backend, dtype):
    g = torch.Generator("cuda").manual_seed(0)
    B, L, D, V = 2, 100, 64, 5003
    hidden = torch.randn(B, L, D, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, D, device="cuda", generator=g) / D ** 0.5).to(dtype)
    _, targets, masked, p_mask = inputs(B, L, V, torch.float32)

    def run(fn, h, w, **kw):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(h, w, targets, masked, p_mask, **kw)
        return [loss.detach(), *torch.autograd.grad(loss, (h, w))]

    out = run(fused_linear_masked_diffusion_loss, hidden, weight, chunk_size=37, backend=backend)
    eager = run(ref.fused_linear_masked_diffusion_loss, hidden, weight)
    exact = run(ref.fused_linear_masked_diffusion_loss, hidden.double(), weight.double())
    for o, e, x in zip(out, eager, exact):
        assert_as_accurate(o, e, x)


@BIG_MEMORY
@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_beyond_int32(backend):
    """[1, 17000, 126464] bf16 logits: 2.15e9 elements (4.3 GB), so the last rows start past
    2^31. Only a few rows are masked, at both ends; each is checked against the reference on
    its own rows."""
    B, L, V = 1, 17000, 126464
    assert B * L * V > 2**31
    g = torch.Generator("cuda").manual_seed(0)
    logits = torch.zeros(B, L, V, dtype=torch.bfloat16, device="cuda")
    rows = torch.tensor([0, 1, L - 2, L - 1], device="cuda")
    logits[0, rows] = (torch.randn(len(rows), V, device="cuda", generator=g) * 3).bfloat16()
    targets = torch.randint(0, V, (B, L), device="cuda", generator=g)
    is_masked = torch.zeros(B, L, dtype=torch.bool, device="cuda")
    is_masked[0, rows] = True
    p_mask = torch.tensor([0.37], device="cuda")
    loss, grad = loss_and_grad(masked_diffusion_loss, logits, targets, is_masked, p_mask,
                               backend=backend)
    sub = (logits[:, rows], targets[:, rows], is_masked[:, rows], p_mask)
    eager = loss_and_grad(ref.masked_diffusion_loss, *sub)
    exact = loss_and_grad(ref.masked_diffusion_loss, sub[0].double(), *sub[1:3], p_mask.double())
    assert_as_accurate(loss, eager[0], exact[0])
    assert_as_accurate(grad[:, rows], eager[1], exact[1])
    assert grad[0, 2:L - 2].count_nonzero() == 0
