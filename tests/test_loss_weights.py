"""The loss for every trainer (issue 12 item 3): a multiplicative per-token token_weight as the
alternative to p_mask on both loss forms, and reduction="none" on the fused form, against the
eager reference, values and gradients (hidden, weight, bias, p_mask / token_weight)."""

import pytest
import torch

import llada_kernels as lk
from llada_kernels import _backend
from llada_kernels.ops import loss as loss_mod
from llada_kernels.reference import loss as reference

BACKENDS = [b for b in ("cpu", "triton") if b in lk.available_backends("masked_diffusion_loss", "cpu")]


def inputs(B=3, L=7, D=12, V=29, seed=0, per_token=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, D, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    t = torch.randint(0, V, (B, L), generator=g)
    m = torch.rand(B, L, generator=g) < 0.6
    m[0, 0] = True
    shape = (B, L) if per_token else (B,)
    tw = (torch.rand(shape, generator=g) * 3).requires_grad_()     # dllm's 1 / t, say
    return h, w, b, t, m, tw


def grads(out, params, upstream=None):
    return torch.autograd.grad(out, params, upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_token", [True, False])
def test_token_weight_on_both_forms_matches_the_reference(backend, per_token):
    h, w, b, t, m, tw = inputs(per_token=per_token)
    tw.data[0] = 0.0  # a weight of 0 is allowed: the row counts for nothing
    want = reference.fused_linear_masked_diffusion_loss(h, w, t, m, bias=b, token_weight=tw)
    got = lk.fused_linear_masked_diffusion_loss(h, w, t, m, token_weight=tw, bias=b, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads(got, (h, w, b, tw)), grads(want, (h, w, b, tw))):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    logits = torch.nn.functional.linear(h, w, b).detach().requires_grad_()
    got = lk.masked_diffusion_loss(logits, t, m, token_weight=tw, backend=backend)
    want = reference.masked_diffusion_loss(logits, t, m, token_weight=tw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads(got, (logits, tw)), grads(want, (logits, tw))):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_token_weight_is_one_over_p_mask():
    h, w, b, t, m, tw = inputs()
    tw = tw.detach() + 0.5
    a = lk.fused_linear_masked_diffusion_loss(h, w, t, m, token_weight=tw, bias=b)
    c = lk.fused_linear_masked_diffusion_loss(h, w, t, m, 1 / tw, bias=b)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["p_mask", "token_weight"])
def test_fused_reduction_none(backend, weighting):
    """Per-token losses [B, L] (0 where not masked), and gradients under a random upstream
    gradient (a per-token meter's or a custom normalisation's) equal the reference's."""
    h, w, b, t, m, tw = inputs(seed=1)
    kw = ({"token_weight": tw} if weighting == "token_weight"
          else {"p_mask": (tw.detach() + 0.2).requires_grad_()})
    wt = next(iter(kw.values()))
    want = reference.fused_linear_masked_diffusion_loss(h, w, t, m, bias=b, reduction="none", **kw)
    got = lk.fused_linear_masked_diffusion_loss(h, w, t, m, bias=b, reduction="none",
                                                backend=backend, **kw)
    assert got.shape == (3, 7) and (got[~m] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    up = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    for a, e in zip(grads(got, (h, w, b, wt), up), grads(want, (h, w, b, wt), up)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    total = lk.fused_linear_masked_diffusion_loss(h, w, t, m, bias=b, backend=backend, **kw)
    torch.testing.assert_close(got.sum(), total, rtol=1e-5, atol=1e-5)


def test_reduction_none_check_fails_when_the_upstream_gradient_is_ignored(monkeypatch):
    """Planted bug: backward recomputes with the unscaled weights (as if every token's upstream
    gradient were 1); the gradient comparison above must then fail."""
    real = loss_mod._FusedPerToken.backward

    def ignoring(ctx, grad):
        return real(ctx, torch.ones_like(grad))
    monkeypatch.setattr(loss_mod._FusedPerToken, "backward", staticmethod(ignoring))
    h, w, b, t, m, tw = inputs(seed=1)
    got = lk.fused_linear_masked_diffusion_loss(h, w, t, m, token_weight=tw, bias=b, reduction="none")
    want = reference.fused_linear_masked_diffusion_loss(h, w, t, m, bias=b, reduction="none",
                                                        token_weight=tw)
    up = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(grads(got, (h,), up)[0], grads(want, (h,), up)[0])


def test_reduction_none_without_grad_and_for_p_mask_only():
    h, w, b, t, m, tw = inputs()
    with torch.no_grad():
        out = lk.fused_linear_masked_diffusion_loss(h, w, t, m, token_weight=tw, reduction="none")
    assert not out.requires_grad
    p = (tw.detach() + 0.3).requires_grad_()
    got = lk.fused_linear_masked_diffusion_loss(h.detach(), w.detach(), t, m, p, reduction="none")
    want = reference.fused_linear_masked_diffusion_loss(h.detach(), w.detach(), t, m, p, reduction="none")
    torch.testing.assert_close(grads(got.sum(), (p,))[0], grads(want.sum(), (p,))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(_backend._C_ERROR is not None, reason="llada_kernels._C not built")
@pytest.mark.parametrize("call,exc,match", [
    (lambda h, w, t, m, tw: lk.masked_diffusion_loss(h @ w.T, t, m), TypeError,
     "masked_diffusion_loss: give exactly one of p_mask .* and token_weight .*; got neither"),
    (lambda h, w, t, m, tw: lk.fused_linear_masked_diffusion_loss(h, w, t, m, tw, token_weight=tw),
     TypeError, "got both"),
    (lambda h, w, t, m, tw: lk.fused_linear_masked_diffusion_loss(h, w, t, m, token_weight=-tw),
     ValueError, r"token_weight must be finite and >= 0 in float32; got -"),
    (lambda h, w, t, m, tw: lk.fused_linear_masked_diffusion_loss(h, w, t, m, token_weight=tw[:, :3]),
     ValueError, r"token_weight must have shape"),
    (lambda h, w, t, m, tw: lk.fused_linear_masked_diffusion_loss(h, w, t, m, tw, reduction="mean"),
     ValueError, r"reduction must be one of \['sum', 'none'\]; got 'mean'"),
])
def test_bad_weighting_is_named(call, exc, match):
    h, w, b, t, m, tw = inputs()
    tw = tw.detach()
    tw[1, 2] = 1.0
    with pytest.raises(exc, match=match):
        call(h, w, t, m, tw)
