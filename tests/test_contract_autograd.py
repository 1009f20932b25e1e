"""Autograd's side of the contract (issue 9 items 1 and 2), on every backend that runs here:

* second derivatives (create_graph=True) are exact for masked_diffusion_loss and refused with
  a clear error, naming the op and how to get them, by the fused form and by
  attention's compiled backends (never silently zero or missing);
* a p_mask that requires grad gets d loss / d p_mask = -CE / p_mask^2 (summed over L for a [B]
  p_mask) from both loss forms.
"""

import pytest
import torch

from llada_kernels import attention, fused_linear_masked_diffusion_loss, masked_diffusion_loss

from conftest import KERNEL_BACKENDS

ALL_BACKENDS = ["reference"] + KERNEL_BACKENDS


def loss_inputs(B=2, L=3, V=7, *, dtype=torch.float64, p_shape="BL", seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.7
    masked[0, 0] = True
    p_mask = torch.rand((B, L) if p_shape == "BL" else (B,), generator=g, dtype=dtype) * 0.8 + 0.2
    return logits, targets, masked, p_mask


# --------------------------------------------------------------------------------------------
# Item 1: double backward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loss_gradgradcheck(backend):
    logits, targets, masked, p_mask = loss_inputs()
    leaves = (logits.requires_grad_(), p_mask.requires_grad_())
    fn = lambda x, p: masked_diffusion_loss(x, targets, masked, p, reduction="none", backend=backend)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_loss_second_derivative_matches_the_reference(backend):
    """A Hessian-vector product in fp32 (the path a gradient penalty takes): it used to be
    None (no autograd kernel for the backward op, and only a warning)."""
    logits, targets, masked, p_mask = loss_inputs(2, 5, 40, dtype=torch.float32)
    v = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))

    def hvp(b):
        x = logits.clone().requires_grad_()
        (g,) = torch.autograd.grad(masked_diffusion_loss(x, targets, masked, p_mask, backend=b), x,
                                   create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), x)
        return g.detach(), h

    got, want = hvp(backend), hvp("reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert want[1].abs().max() > 1e-3  # not vacuous


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_loss_refuses_double_backward(backend):
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    _, targets, masked, p_mask = loss_inputs(2, 3, 9, dtype=torch.float32)
    loss = fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask, backend=backend)
    with pytest.raises(RuntimeError, match=r"fused_linear_masked_diffusion_loss: double backward "
                                           r"\(create_graph=True\) is not supported.*backend='reference'"):
        torch.autograd.grad(loss, hidden, create_graph=True)
    # The first backward alone still works (retain_graph for the failed attempt's graph).
    loss = fused_linear_masked_diffusion_loss(hidden, weight, targets, masked, p_mask, backend=backend)
    assert torch.autograd.grad(loss, hidden)[0].abs().sum() > 0


def test_fused_loss_reference_has_second_derivatives():
    hidden = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64)
    _, targets, masked, p_mask = loss_inputs(1, 3, 9)
    assert torch.autograd.gradgradcheck(
        lambda h: fused_linear_masked_diffusion_loss(h, weight, targets, masked, p_mask,
                                                     backend="reference"), (hidden,))


ATTENTION = [pytest.param("cpu", torch.float32, id="cpu"),
             pytest.param("triton", torch.float16, id="triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend, dtype", ATTENTION)
def test_attention_refuses_double_backward(backend, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out = attention(q, k, v, backend=backend)
    with pytest.raises(RuntimeError, match=r"attention: double backward "
                                           r"\(create_graph=True\) is not supported.*backend='reference'"):
        torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    out = attention(q, k, v, backend=backend)  # a plain backward still works
    assert all(t.abs().sum() > 0 for t in torch.autograd.grad(out.square().sum(), (q, k, v)))


def test_attention_reference_has_second_derivatives():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradgradcheck(lambda *t: attention(*t, backend="reference"), (q, k, v))


# --------------------------------------------------------------------------------------------
# Item 2: the gradient in p_mask
# --------------------------------------------------------------------------------------------

def formula_grad(logits, targets, masked, p_mask):
    """d loss / d p_mask = -CE / p_mask^2 at masked positions, summed over L for a [B] p_mask."""
    ce = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), targets, reduction="none")
    p = p_mask.double() if p_mask.dim() == 2 else p_mask.double()[:, None].expand(masked.shape)
    g = torch.where(masked, -ce / p ** 2, 0)
    return g if p_mask.dim() == 2 else g.sum(1)


def p_mask_grads(backend, fused, logits, targets, masked, p_mask, *, logits_grad=True):
    p = p_mask.clone().requires_grad_()
    if fused:  # logits = hidden @ I: the fused form sees the same logits
        V = logits.shape[-1]
        x = logits.clone().requires_grad_(logits_grad)
        loss = fused_linear_masked_diffusion_loss(x, torch.eye(V, dtype=logits.dtype), targets, masked, p,
                                                  backend=backend)
    else:
        x = logits.clone().requires_grad_(logits_grad)
        loss = masked_diffusion_loss(x, targets, masked, p, backend=backend)
    leaves = (p, x) if logits_grad else (p,)
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("p_shape", ["B", "BL"])
@pytest.mark.parametrize("only_p_mask", [False, True], ids=["with_logits", "only_p_mask"])
def test_p_mask_gradient(backend, fused, p_shape, only_p_mask):
    """It used to be None (cpu, triton), and the fused form raised naming an internal flag when
    only p_mask required grad."""
    logits, targets, masked, p_mask = loss_inputs(2, 4, 11, dtype=torch.float32, p_shape=p_shape)
    got = p_mask_grads(backend, fused, logits, targets, masked, p_mask, logits_grad=not only_p_mask)
    assert got[0].shape == p_mask.shape and got[0].dtype == p_mask.dtype
    torch.testing.assert_close(got[0].double(), formula_grad(logits, targets, masked, p_mask),
                               rtol=1e-5, atol=1e-6)
    if not only_p_mask:  # and the logits' gradient is as without p_mask's
        want = p_mask_grads(backend, fused, logits, targets, masked, p_mask.detach().requires_grad_(False))
        torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_p_mask_gradcheck(backend, fused):
    logits, targets, masked, p_mask = loss_inputs(1, 3, 5, p_shape="B")
    V = logits.shape[-1]

    def fn(x, p):
        if fused:
            return fused_linear_masked_diffusion_loss(x, torch.eye(V, dtype=x.dtype), targets, masked, p,
                                                      chunk_size=2, backend=backend)
        return masked_diffusion_loss(x, targets, masked, p, backend=backend)

    assert torch.autograd.gradcheck(fn, (logits.requires_grad_(), p_mask.requires_grad_()))


def test_formula_grad_is_what_the_reference_differentiates():
    """The test's formula agrees with autograd through the eager definition, and would catch a
    gradient missing its square (a planted bug)."""
    logits, targets, masked, p_mask = loss_inputs(2, 3, 5, p_shape="B")
    p = p_mask.clone().requires_grad_()
    (want,) = torch.autograd.grad(masked_diffusion_loss(logits, targets, masked, p, backend="reference"), p)
    torch.testing.assert_close(formula_grad(logits, targets, masked, p_mask), want)
    planted = formula_grad(logits, targets, masked, p_mask) * p_mask  # -CE / p instead of -CE / p^2
    assert not torch.allclose(planted, want)
