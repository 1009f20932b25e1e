"""masked_diffusion_loss and fused_linear_masked_diffusion_loss: LLaDA's training loss.

    loss = sum over masked (b, l) of CE(logits[b, l], targets[b, l]) / p_mask[b, l]

Both forms reduce the batch to rows r = (b, l), N = B * L of them, with a weight per row:
w_r = 1 / p_mask where masked (or a caller's multiplicative token_weight instead), 0 where not
(such rows are skipped). The row kernels
(llada::masked_diffusion_loss, _backward, _fwd_bwd; schemas in csrc/ops.cpp) see only logits
[N, V], targets [N] and weights [N], and return each row's cross-entropy ce [N]; the loss is
sum(w * ce), multiplied here, so that autograd differentiates p_mask through w = 1 / p_mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend, _checks, _machine
from ..distributed import _exchange
from ..reference import loss as reference

OP = "masked_diffusion_loss"
FUSED_OP = "fused_linear_masked_diffusion_loss"
REDUCTIONS = ("sum", "none")


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor | None = None,
    *,
    token_weight: torch.Tensor | None = None,
    reduction: str = "sum",
    backend: str | None = None,
    group=None,
    vocab_offset: int = 0,
) -> torch.Tensor:
    """Cross-entropy of the masked positions, each divided by its mask probability (or
    multiplied by a per-token weight).

    Args:
        logits: [B, L, V] float32, bfloat16, float16 (or float64, for gradcheck). The vocabulary
            dimension is made contiguous, and [B, L] flattened, by a copy if they are not.
        targets: [B, L] int64, the clean tokens. Read only where masked; there they must be in
            [0, V).
        masked: [B, L] bool, the positions that were masked (the only ones that count).
        p_mask: [B] (one per sequence) or [B, L], floating, finite and > 0: each position's mask
            probability, the divisor of its cross-entropy. For SFT pass
            p_mask * answer_length[:, None].
        token_weight: instead of p_mask, [B] or [B, L], floating, finite and >= 0: a weight
            that multiplies each position's cross-entropy, as MDLM-style trainers write it
            (dllm: w = -alpha'(t) / (1 - alpha(t))). Exactly one of p_mask and token_weight.
            (Not `weight`: the fused form's `weight` is the lm_head.) A token_weight that
            requires grad gets d loss / d token_weight = CE.
        reduction: "sum" (a scalar) or "none" ([B, L], 0 where not masked).
        backend: "reference", "cpu", "triton" or "cuda"; see llada_kernels._backend.
        group, vocab_offset: vocabulary parallelism (llada_kernels.distributed): a
            torch.distributed process group over which the vocabulary is split, and the first
            id of this rank's shard. logits is then the shard [B, L, V_r] of ids
            [vocab_offset, vocab_offset + V_r) (uneven shards allowed); targets, masked and
            p_mask (or token_weight) are the same on every rank, targets global ids; both
            reductions. The ranks exchange three numbers per position (row max, log-sum-exp,
            target logit), never logits; every rank gets the loss of the whole vocabulary and
            the gradient of its own shard. The backward communicates nothing.

    Returns:
        sum over masked (b, l) of CE(logits[b, l], targets[b, l]) / p_mask[b, l], in float32
        (float64 for float64 logits), whatever the logits' dtype. The caller divides: by B * L
        for pre-training, by B for SFT (see llada_kernels.training).

    Gradient: d loss / d logits in the logits' dtype, computed in float32; exactly zero on
    unmasked rows. A p_mask that requires grad gets d loss / d p_mask = -CE / p_mask^2 (summed
    over L for a [B] p_mask), on every backend. Double backward (create_graph=True) is exact
    on every backend: the first backward then runs in eager PyTorch ops (materialising the
    softmax) so that it can be differentiated again. No host synchronisation (the value checks
    aside: see _checks).

    Non-finite and extreme logits (README, "Non-finite and extreme inputs"): a masked row with
    a NaN or +inf logit, or with every logit -inf, has a NaN loss and a NaN gradient row (as
    eager F.cross_entropy); a -inf target logit (with a finite max) gives +inf and a finite
    gradient; -inf elsewhere is probability 0. Every backend subtracts the row max before the
    log-sum-exp and the target, so large logits lose nothing (32 equal logits of 1e8: log 32).
    Unmasked rows are never read.
    """
    vocab_offset = _exchange.check_args(OP, group, vocab_offset)
    B, L, V = _check(OP, logits, "logits", targets, masked, p_mask, token_weight,
                     sharded=group is not None)
    _checks.check_in(OP, "reduction", reduction, REDUCTIONS)
    name = _backend.resolve(OP, backend, logits.device)
    if group is not None:
        from ..distributed import loss as vocab_parallel
        return vocab_parallel.masked_diffusion_loss(logits, targets, masked, p_mask, token_weight,
                                                    reduction, name, group, vocab_offset)
    if name == "reference":
        return reference.masked_diffusion_loss(logits, targets, masked, p_mask, reduction=reduction,
                                               token_weight=token_weight)

    op = torch.ops.llada.masked_diffusion_loss_triton if name == "triton" else torch.ops.llada.masked_diffusion_loss
    rows = logits.reshape(B * L, V)
    weights = _row_weights(masked, p_mask, token_weight, B, L, logits.dtype)  # differentiable
    # The kernels run the rows whose weight is not 0: every masked row (a token_weight of 0
    # still has d loss / d token_weight = CE), which the backward scales by grad * w.
    active = weights.detach() if token_weight is None else masked.reshape(-1).to(weights.dtype)
    ce, _ = op(rows if rows.stride(-1) == 1 else rows.contiguous(), targets.reshape(-1).contiguous(),
               active)
    losses = ce * weights
    return losses.sum() if reduction == "sum" else losses.view(B, L)


def fused_linear_masked_diffusion_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    p_mask: torch.Tensor | None = None,
    *,
    token_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    reduction: str = "sum",
    chunk_size: int | None = None,
    backend: str | None = None,
    group=None,
    vocab_offset: int = 0,
) -> torch.Tensor:
    """masked_diffusion_loss(hidden @ weight.T + bias, ...) without materialising the logits.

    Only the masked rows of hidden are gathered and multiplied by the lm_head, chunk_size rows at
    a time: lm_head FLOPs scale with the number of masked rows, and the extra memory is one
    [chunk_size, V] buffer of logits, never [B, L, V]. Each chunk's logits are overwritten in
    place by their gradient (llada::masked_diffusion_loss_fwd_bwd), which is then multiplied out
    into d hidden and d weight at once, so that backward only scales them by the upstream
    gradient (the Liger-Kernel approach). Under torch.no_grad nothing is kept.

    Args:
        hidden: [B, L, D] float32, bfloat16, float16 (or float64), the last hidden states.
        weight: [V, D], same dtype, the lm_head.
        targets, masked, p_mask, token_weight: as masked_diffusion_loss.
        bias: [V] or None, same dtype.
        reduction: "sum" (a scalar) or "none" (the [B, L] per-token losses, 0 where not
            masked, for per-token meters such as dllm's NLL/PPL). With "none" the forward keeps
            no gradient: backward recomputes each chunk's logits once, with the upstream
            per-token gradient folded into the row weights (Liger's approach), so a backward
            costs one more pass of lm_head GEMMs than with "sum".
        chunk_size: rows per chunk; None sizes it from the machine's last-level cache, the
            GEMMs' needs and the temporaries (llada_kernels._machine.fused_loss_chunk_rows).
        backend: the kernel that turns each chunk's logits into loss and gradient: "cpu",
            "triton", "cuda", or "reference" (the eager full-logits definition).
        group, vocab_offset: vocabulary parallelism, as masked_diffusion_loss: weight (and
            bias) are this rank's rows [V_r, D] of the lm_head, ids [vocab_offset,
            vocab_offset + V_r); hidden, targets, masked and p_mask (or token_weight, its
            requires_grad too) are the same on every rank. Per chunk the ranks exchange three
            numbers per row; at the end they all-reduce d hidden of the masked rows (fp32,
            [M, D]), so that hidden gets its whole gradient, as in the single-process op (the
            all-reduce a column-parallel lm_head needs in its backward, done here because this
            op makes its gradients in the forward). weight and bias get their shard's
            gradient. Each chunk holds its logits and their gradient ([chunk, V_r] twice), and
            every rank runs the same chunks (sized from the largest shard; a rank whose masked
            rows differ in number is refused by name). With reduction="none" the forward keeps
            each row's whole-vocabulary (max, log-sum-exp) ([B * L, 2] fp32), so that the
            backward's recomputed chunks exchange nothing; its one collective is the
            all-reduce of d hidden (every rank must run that backward).

    Returns:
        The loss, a float32 (float64) scalar (or [B, L]), as masked_diffusion_loss.

    Synchronisation: gathering the masked rows needs their number, so the host waits for the
    device once per call (torch.nonzero). Under torch.compile the whole computation is one
    opaque operator, so the graph does not break.

    Memory: with gradients enabled, d hidden ([B, L, D], hidden's dtype), d weight ([V, D],
    accumulated in float32 across chunks) and d bias are computed in the forward and kept
    until backward, which scales them by the upstream gradient (see _fused_backward).

    Gradients: hidden, weight, bias, and p_mask when it requires grad (-CE / p_mask^2, from
    each row's cross-entropy, kept as an [B * L] vector). Double backward (create_graph=True)
    raises: the gradients are computed in the forward and are not differentiable again; use
    masked_diffusion_loss on materialised logits, or backend="reference". Non-finite logits
    follow masked_diffusion_loss.
    """
    vocab_offset = _exchange.check_args(FUSED_OP, group, vocab_offset)
    B, L, D = _check(FUSED_OP, hidden, "hidden", targets, masked, p_mask, token_weight)
    _checks.check_in(FUSED_OP, "reduction", reduction, REDUCTIONS)
    _checks.check_tensor(FUSED_OP, "weight", weight, dtypes=(hidden.dtype,), ndim=2)
    _checks.check_shape(FUSED_OP, "weight", weight, ("V", D))
    _checks.check_device(FUSED_OP, "weight", weight, hidden.device, "hidden")
    V = weight.shape[0]
    if bias is not None:
        _checks.check_tensor(FUSED_OP, "bias", bias, dtypes=(hidden.dtype,), ndim=1)
        _checks.check_shape(FUSED_OP, "bias", bias, (V,))
        _checks.check_device(FUSED_OP, "bias", bias, hidden.device, "hidden")
    if group is None:
        _checks.check_index(FUSED_OP, "targets", targets, V, where=masked)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        _checks.fail(FUSED_OP, f"chunk_size must be a positive int or None; got {chunk_size!r}")
    # The row kernels are what the backend provides; they live with masked_diffusion_loss.
    name = _backend.resolve(OP, backend, hidden.device)
    if group is not None:
        from ..distributed import loss as vocab_parallel
        return vocab_parallel.fused_linear_masked_diffusion_loss(
            hidden, weight, targets, masked, p_mask, token_weight, bias, reduction, chunk_size,
            name, group, vocab_offset)
    if name == "reference":
        return reference.fused_linear_masked_diffusion_loss(
            hidden, weight, targets, masked, p_mask, bias=bias, reduction=reduction,
            token_weight=token_weight)
    weights = _row_weights(masked, p_mask, token_weight, B, L, hidden.dtype)
    rows, targets = hidden.reshape(B * L, D), targets.reshape(-1).contiguous()
    if reduction == "none":
        active = masked.reshape(-1).to(weights.dtype)  # ce of every masked row, weight 0 too
        return _FusedPerToken.apply(rows, weight, bias, targets, weights, active, chunk_size or 0,
                                    name).view(B, L)
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    # The weights carry p_mask's gradient (the op's backward gives d loss / d weights = ce).
    loss, *_ = torch.ops.llada.fused_linear_masked_diffusion_loss(
        rows, weight, bias, targets, weights, chunk_size or 0, name, compute_grad)
    if token_weight is not None and token_weight.requires_grad and torch.is_grad_enabled():
        loss = loss + _idle_rows_term(rows, weight, bias, targets, masked, weights, chunk_size, name)
    return loss


def _idle_rows_term(rows, weight, bias, targets, masked, weights, chunk_size, backend):
    """0, with the gradient d loss / d token_weight = CE on the masked rows whose token_weight
    is 0 (which the composite skips). One host sync, only when token_weight requires grad."""
    idle = masked.reshape(-1) & (weights.detach() == 0)
    if not bool(idle.any()):
        return 0
    with torch.no_grad():
        _, ce, *_ = torch.ops.llada.fused_linear_masked_diffusion_loss(
            rows, weight, bias, targets, idle.to(weights.dtype), chunk_size or 0, backend, False)
    return (ce * weights).sum()


def _check(op, x, x_name, targets, masked, p_mask, token_weight=None, sharded=False):
    """Checks shared by both forms; x is logits [B, L, V] or hidden [B, L, D]. With sharded
    logits the targets are checked against the whole vocabulary later (it takes a collective)."""
    _checks.check_tensor(op, x_name, x, dtypes=_checks.FLOAT_DTYPES + (torch.float64,), ndim=3)
    B, L, last = x.shape
    for name, t, dtypes in (("targets", targets, (torch.int64,)), ("masked", masked, (torch.bool,))):
        _checks.check_tensor(op, name, t, dtypes=dtypes, ndim=2)
        _checks.check_shape(op, name, t, (B, L))
        _checks.check_device(op, name, t, x.device, x_name)
    if (p_mask is None) == (token_weight is None):
        _checks.fail(op, "give exactly one of p_mask (the loss divides by it) and token_weight "
                     f"(the loss multiplies by it); got {'both' if p_mask is not None else 'neither'}",
                     TypeError)
    name, w = ("p_mask", p_mask) if p_mask is not None else ("token_weight", token_weight)
    _checks.check_tensor(op, name, w, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    if w.dim() == 1:
        _checks.check_shape(op, name, w, (B,))
    else:
        _checks.check_shape(op, name, w, (B, L))
    _checks.check_device(op, name, w, x.device, x_name)
    # Checked as the kernels use it: cast to the accumulation dtype (and p_mask inverted).
    if p_mask is not None:
        _checks.check_positive_finite(op, "p_mask", p_mask, reference.accumulation_dtype(x.dtype))
    else:
        _checks.check_nonnegative_finite(op, "token_weight", token_weight,
                                         reference.accumulation_dtype(x.dtype))
    if x_name == "logits" and not sharded:
        _checks.check_index(op, "targets", targets, last, where=masked)
    return B, L, last


def _row_weights(masked, p_mask, token_weight, B, L, dtype):
    """[N] weights in the accumulation dtype: 1 / p_mask (or token_weight) where masked, 0
    elsewhere (differentiable in p_mask or token_weight)."""
    acc = reference.accumulation_dtype(dtype)
    if token_weight is not None:
        return torch.where(masked, reference.expand_p_mask(token_weight, B, L).to(acc), 0).reshape(-1)
    p = reference.expand_p_mask(p_mask, B, L).to(acc)
    return torch.where(masked, p.reciprocal(), 0).reshape(-1)


# --- the row kernels: fakes and autograd -----------------------------------------------------

def _rows_fake(logits, targets, weights):
    return torch.empty_like(weights), weights.new_empty((weights.shape[0], 2))


def _backward_fake(grad_ce, logits, targets, weights, stats):
    return logits.new_empty(logits.shape)


def _fwd_bwd_fake(logits, targets, weights):
    return torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    logits, targets, weights = inputs
    ctx.save_for_backward(logits, targets, weights, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # stats are never differentiated: no zeros for their gradient


def _autograd_backward(backward_op):
    def backward(ctx, grad_ce, _grad_stats):
        if grad_ce is None or not ctx.needs_input_grad[0]:
            return None, None, None
        logits, targets, weights, stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable again
            return _differentiable_grad(grad_ce, logits, targets, weights), None, None
        return backward_op(grad_ce.contiguous(), logits, targets, weights, stats), None, None
    return backward


def _differentiable_grad(grad_ce, logits, targets, weights):
    """The backward kernel's result, grad_ce * (softmax(logits) - onehot(targets)) on rows with
    weight != 0 and 0 elsewhere, in eager PyTorch ops, so that autograd can differentiate it
    again (double backward). logits [N, V], targets [N], weights and grad_ce [N]."""
    V = logits.shape[1]
    active = weights != 0
    probs = torch.softmax(logits.to(weights.dtype), dim=-1)
    onehot = F.one_hot(torch.where(active, targets, 0).clamp(0, max(V - 1, 0)), V).to(probs.dtype)
    grad = (probs - onehot) * torch.where(active, grad_ce, 0)[:, None]
    return torch.where(active[:, None], grad, 0).to(logits.dtype)


# --- the fused-linear composite ---------------------------------------------------------------

def _chunk_rows(M, D, V, dtype):
    acc = reference.accumulation_dtype(dtype)
    return _machine.fused_loss_chunk_rows(M, D, V, dtype.itemsize, acc.itemsize)


def _row_ops(backend):
    """The row kernels (forward, backward, in-place forward-backward) that `backend` provides."""
    suffix = "_triton" if backend == "triton" else ""
    return (getattr(torch.ops.llada, "masked_diffusion_loss" + suffix),
            getattr(torch.ops.llada, "masked_diffusion_loss_backward" + suffix),
            getattr(torch.ops.llada, "masked_diffusion_loss_fwd_bwd" + suffix))


def _fused_impl(hidden, weight, bias, targets, weights, chunk_size, backend, compute_grad):
    """hidden [N, D], weight [V, D], bias [V] or None, targets [N], weights [N] (0 = unmasked)."""
    fwd, _, fwd_bwd = _row_ops(backend)

    def step(logits, t, w, _index):  # each chunk's loss, and its gradient over its logits
        if not compute_grad:
            return fwd(logits, t, w)[0], None
        return fwd_bwd(logits, t, w), logits

    rows = torch.nonzero(weights).squeeze(1)  # the one host sync: the masked count
    chunk = chunk_size if chunk_size > 0 else _chunk_rows(rows.numel(), hidden.shape[1],
                                                          weight.shape[0], hidden.dtype)
    return _fused_chunks(hidden, weight, bias, targets, weights, rows, chunk, compute_grad, step)


def _fused_chunks(hidden, weight, bias, targets, weights, rows, chunk, compute_grad, step,
                  grad_hidden_dtype=None):
    """The chunk loop of the fused form, over the masked rows `rows` [M] (indices into N):
    per chunk, logits = h @ weight.T + bias [C, V], then step(logits, t, w, index) -> (ce [C],
    the gradient of sum(w * ce) in the logits [C, V], possibly `logits` itself, or None without
    gradients), which is multiplied out into d hidden, d weight and d bias (index [C]: the
    chunk's rows, for a step that keeps per-row state). Returns the op's
    five outputs (loss, ce, grad_hidden [N, D] in grad_hidden_dtype or hidden's, grad_weight,
    grad_bias)."""
    N, D = hidden.shape
    V = weight.shape[0]
    M = rows.numel()
    ce = torch.zeros_like(weights)  # each row's cross-entropy, 0 where unmasked
    acc = weights.dtype
    if compute_grad:
        grad_hidden = torch.zeros(hidden.shape, dtype=grad_hidden_dtype or hidden.dtype,
                                  device=hidden.device)
        # d weight accumulates over chunks in the accumulation dtype.
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = torch.zeros(V, dtype=acc, device=weight.device) if bias is not None else None
    for start in range(0, M, chunk):
        index = rows[start:start + chunk]
        h = hidden.index_select(0, index)                     # [C, D]
        logits = F.linear(h, weight, bias)                    # [C, V]
        t, w = targets.index_select(0, index), weights.index_select(0, index)
        chunk_ce, grad = step(logits, t, w, index)
        ce.index_copy_(0, index, chunk_ce)
        if not compute_grad:
            del logits, h
            continue
        del logits
        grad_hidden.index_copy_(0, index, (grad @ weight).to(grad_hidden.dtype))  # [C, D]
        if grad_weight.dtype == grad.dtype:
            grad_weight.addmm_(grad.t(), h)
        else:
            grad_weight += (grad.t() @ h).to(acc)
        if grad_bias is not None:
            grad_bias += grad.sum(0, dtype=acc)
        del grad, h  # free this chunk before the next one is allocated
    loss = (ce * weights).sum()
    if not compute_grad:
        empty = hidden.new_empty(0)
        return loss, ce, empty, empty.clone(), empty.clone()
    grad_bias = grad_bias.to(hidden.dtype) if grad_bias is not None else hidden.new_empty(0)
    return loss, ce, grad_hidden, grad_weight.to(weight.dtype), grad_bias


def _fused_fake(hidden, weight, bias, targets, weights, chunk_size, backend, compute_grad):
    loss, ce = weights.new_empty(()), torch.empty_like(weights)
    if not compute_grad:
        return loss, ce, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    return (loss, ce, torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else hidden.new_empty(0))


def _fused_setup_context(ctx, inputs, output):
    _, ce, grad_hidden, grad_weight, grad_bias = output
    ctx.has_bias = inputs[2] is not None
    ctx.compute_grad = inputs[7]
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, ce)
    ctx.mark_non_differentiable(ce, grad_hidden, grad_weight, grad_bias)
    # The other outputs are never differentiated: without this, autograd would hand backward
    # a zero tensor for each of them, a [V, D] allocation for nothing.
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_loss, *_unused):
    """The gradients computed in the forward, scaled by grad_loss, and the weights' gradient
    grad_loss * ce (p_mask's, through w = 1 / p_mask). The products are new tensors (scaling
    the saved ones in place would break retain_graph), so d weight is briefly held twice: the
    backward's peak is one [V, D] above the forward's end."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{FUSED_OP}: double backward (create_graph=True) is not supported: its gradients "
            "are computed in the forward pass and cannot be differentiated again. Use "
            "masked_diffusion_loss on the materialised logits (hidden @ weight.T + bias), whose "
            "every backend supports it, or backend='reference'.")
    if grad_loss is None:
        return (None,) * 8
    grad_hidden, grad_weight, grad_bias, ce = ctx.saved_tensors
    if any(ctx.needs_input_grad[:3]) and not ctx.compute_grad:
        raise RuntimeError(f"{FUSED_OP}: hidden, weight or bias needs a gradient, but the forward "
                           "ran without computing gradients (under torch.no_grad, or with none "
                           "of them requiring grad)")
    scaled = [g * grad_loss.to(g.dtype) if need and ctx.compute_grad else None
              for g, need in zip((grad_hidden, grad_weight, grad_bias), ctx.needs_input_grad[:3])]
    grad_weights = ce * grad_loss.to(ce.dtype) if ctx.needs_input_grad[4] else None
    return (scaled[0], scaled[1], scaled[2] if ctx.has_bias else None, None, grad_weights,
            None, None, None)


class _FusedPerToken(torch.autograd.Function):
    """reduction="none" of the fused form: per-row losses w * ce [N]. The forward runs the
    composite without gradients on the active rows (the masked ones; ce only, no logits
    kept); backward recomputes the chunks with row weights w * g (g the upstream [N]
    gradient), which is exactly the gradient of sum(g * w * ce), and gives d w = g * ce
    (p_mask's or token_weight's, through w)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, active, chunk_size, backend):
        _, ce, *_ = torch.ops.llada.fused_linear_masked_diffusion_loss(
            hidden, weight, bias, targets, active, chunk_size, backend, False)
        ctx.save_for_backward(hidden, weight, bias, targets, weights, ce)
        ctx.chunk_size, ctx.backend = chunk_size, backend
        return ce * weights.detach()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, weights, ce = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [None, None, None]
        if any(needs[:3]):
            folded = (weights * grad.to(weights.dtype)).contiguous()
            _, _, gh, gw, gb = torch.ops.llada.fused_linear_masked_diffusion_loss(
                hidden, weight, bias, targets, folded, ctx.chunk_size, ctx.backend, True)
            grads = [gh if needs[0] else None, gw if needs[1] else None,
                     gb if needs[2] and bias is not None else None]
        grad_weights = grad.to(ce.dtype) * ce if needs[4] else None
        return grads[0], grads[1], grads[2], None, grad_weights, None, None, None


def register():
    """Fakes and autograd of the row kernels, and the fused-linear composite's kernels."""
    for suffix, backward_op in (("", torch.ops.llada.masked_diffusion_loss_backward),
                                ("_triton", torch.ops.llada.masked_diffusion_loss_backward_triton)):
        torch.library.register_fake(f"llada::masked_diffusion_loss{suffix}")(_rows_fake)
        torch.library.register_fake(f"llada::masked_diffusion_loss_backward{suffix}")(_backward_fake)
        torch.library.register_fake(f"llada::masked_diffusion_loss_fwd_bwd{suffix}")(_fwd_bwd_fake)
        torch.library.register_autograd(f"llada::masked_diffusion_loss{suffix}",
                                        _autograd_backward(backward_op), setup_context=_setup_context)
    torch.library.register_kernel(f"llada::{FUSED_OP}", ("cpu", "cuda"), _fused_impl)
    torch.library.register_fake(f"llada::{FUSED_OP}")(_fused_fake)
    torch.library.register_autograd(f"llada::{FUSED_OP}", _fused_backward,
                                    setup_context=_fused_setup_context)
