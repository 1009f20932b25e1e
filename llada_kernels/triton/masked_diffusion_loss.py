"""Triton kernels of the masked diffusion loss (schemas: csrc/ops.cpp, *_triton twins).

Row r holds logits x[0..V) of one (batch, position), its target t and weight w = 1 / p_mask
(0 where the position is not masked: the row is skipped, its ce and gradient are zero). Its
stats are m = max_j x_j and ls = log sum_j exp(x_j - m), kept apart (at large logits m + ls
rounds to m):

    ce_r   = ls + (m - x_t)
    dx_j   = g_r * (exp((x_j - m) - ls) - [j == t])      (g_r: the gradient of ce_r)

A row with a NaN or +inf logit gets stats (NaN, NaN), a row of -inf (-inf, -inf) (the max and
the log of an empty sum, which a vocabulary-parallel shard may hold); either way its ce and
gradient are NaN (README, "Non-finite and extreme inputs").

Forward: one program per row, one pass over the row with an online log-sum-exp. Each block of
BLOCK_V logits updates the running max m and the running sum s of exp(x - m):

    m' = max(m, max_j x_j),   s' = s * exp(m - m') + sum_j exp(x_j - m')

Backward: a grid of (row, block of V) programs, each reading BLOCK_V logits and writing their
gradient. The in-place form (fused-linear chunks) runs both in one program per row: a pass for
the stats, a second that overwrites the row with the gradient of w * ce, with no second buffer.

All arithmetic is in the weights' dtype (fp32, or fp64 for fp64 logits); row offsets are int64.
A target outside [0, V) (unchecked only with LLADA_CHECK_VALUES=0) gives a NaN loss, never an
out-of-bounds read.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _row_stats(row_ptr, v_end, BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    """(m, ls) of x[0, v_end), online; (NaN, NaN) with a NaN or +inf logit, (-inf, -inf) when
    every logit is -inf or v_end = 0."""
    m = tl.full([], float("-inf"), ACC)
    s = tl.zeros([], ACC)
    for start in range(0, v_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < v_end, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit seen is -inf, m_new is -inf: shift by 0 so exp gives 0, not NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    # A NaN logit makes s NaN even where tl.max drops NaN; +inf makes m +inf (and s NaN).
    ok = (tl.abs(m) < float("inf")) & (s == s)
    empty = (m == float("-inf")) & (s == 0)  # every logit -inf: the log of an empty sum
    bad = tl.where(empty, float("-inf"), float("nan"))
    return tl.where(ok, m, bad), tl.where(ok, tl.log(tl.where(ok, s, 1.0)), bad)


@triton.jit
def _target_logit(row_ptr, t, v_end, ACC: tl.constexpr):
    """x_t, or NaN when t is outside [0, v_end) (v_end = 0 for an inactive row: no load)."""
    valid = (t >= 0) & (t < v_end)
    return tl.load(row_ptr + tl.where(valid, t, 0), mask=valid, other=float("nan")).to(ACC)


@triton.jit
def masked_diffusion_loss_fwd_kernel(
    logits_ptr, targets_ptr, weights_ptr, ce_ptr, stats_ptr, V, stride_row,
    BLOCK_V: tl.constexpr,
):
    ACC: tl.constexpr = weights_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    active = tl.load(weights_ptr + row) != 0
    v_end = tl.where(active, V, 0)  # an inactive row loads nothing
    row_ptr = logits_ptr + row * stride_row
    m, ls = _row_stats(row_ptr, v_end, BLOCK_V, ACC)
    xt = _target_logit(row_ptr, tl.load(targets_ptr + row), v_end, ACC)
    tl.store(ce_ptr + row, tl.where(active, ls + (m - xt), 0.0))
    tl.store(stats_ptr + 2 * row, tl.where(active, m, 0.0))
    tl.store(stats_ptr + 2 * row + 1, tl.where(active, ls, 0.0))


@triton.jit
def masked_diffusion_loss_bwd_kernel(
    grad_ce_ptr, logits_ptr, targets_ptr, weights_ptr, stats_ptr, grad_ptr, V, stride_row,
    BLOCK_V: tl.constexpr,
):
    ACC: tl.constexpr = weights_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    active = tl.load(weights_ptr + row) != 0
    scale = tl.load(grad_ce_ptr + row)
    m = tl.load(stats_ptr + 2 * row)
    ls = tl.load(stats_ptr + 2 * row + 1)
    t = tl.load(targets_ptr + row)
    x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < tl.where(active, V, 0),
                other=float("-inf")).to(ACC)
    dx = (tl.exp((x - m) - ls) - tl.where(cols == t, 1.0, 0.0)) * scale
    tl.store(grad_ptr + row * V + cols, tl.where(active, dx, 0.0).to(grad_ptr.dtype.element_ty),
             mask=cols < V)


@triton.jit
def masked_diffusion_loss_fwd_bwd_kernel(
    logits_ptr, targets_ptr, weights_ptr, ce_ptr, V, stride_row,
    BLOCK_V: tl.constexpr,
):
    ACC: tl.constexpr = weights_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(weights_ptr + row)
    active = w != 0
    v_end = tl.where(active, V, 0)
    t = tl.load(targets_ptr + row)
    row_ptr = logits_ptr + row * stride_row
    m, ls = _row_stats(row_ptr, v_end, BLOCK_V, ACC)
    xt = _target_logit(row_ptr, t, v_end, ACC)
    tl.store(ce_ptr + row, tl.where(active, ls + (m - xt), 0.0))
    # Second pass: overwrite the row with d (w * ce_r) / d x (zero for an inactive row).
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < v_end, other=float("-inf")).to(ACC)
        dx = (tl.exp((x - m) - ls) - tl.where(cols == t, 1.0, 0.0)) * w
        tl.store(row_ptr + cols, tl.where(active, dx, 0.0).to(logits_ptr.dtype.element_ty), mask=cols < V)


# --- host launchers, registered as the kernels of the *_triton operators ------------------------

def _device(t: torch.Tensor):
    """Launch on t's GPU (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _fwd(logits, targets, weights):
    N, V = logits.shape
    ce = torch.empty_like(weights)
    stats = torch.empty((N, 2), dtype=weights.dtype, device=weights.device)
    if N:
        with _device(logits):
            masked_diffusion_loss_fwd_kernel[(N,)](
                logits, targets, weights, ce, stats, V, logits.stride(0),
                BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return ce, stats


def _bwd(grad_ce, logits, targets, weights, stats):
    N, V = logits.shape
    grad = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N and V:
        with _device(logits):
            masked_diffusion_loss_bwd_kernel[(N, triton.cdiv(V, BLOCK_V))](
                grad_ce, logits, targets, weights, stats, grad, V, logits.stride(0),
                BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return grad


def _fwd_bwd(logits, targets, weights):
    N, V = logits.shape
    ce = torch.empty_like(weights)
    if N:
        with _device(logits):
            masked_diffusion_loss_fwd_bwd_kernel[(N,)](
                logits, targets, weights, ce, V, logits.stride(0),
                BLOCK_V=BLOCK_V, num_warps=NUM_WARPS)
    return ce


for _name, _fn in (("masked_diffusion_loss_triton", _fwd),
                   ("masked_diffusion_loss_backward_triton", _bwd),
                   ("masked_diffusion_loss_fwd_bwd_triton", _fwd_bwd)):
    torch.library.register_kernel(f"llada::{_name}", ("cuda", "cpu"), _fn)


# --- ahead-of-time compile specs (llada_kernels/triton/_aot.py) --------------------------------

def _aot_specs():
    try:
        from ._aot import AotSpec
    except ImportError:  # the AOT helper is not in this tree: same fields, as a plain record
        from collections import namedtuple
        AotSpec = namedtuple("AotSpec", "name fn signature constexprs num_warps num_stages")
    specs = []
    for ty, acc in (("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "fp64")):
        x, w = f"*{ty}", f"*{acc}"
        common = {"targets_ptr": "*i64", "weights_ptr": w, "V": "i32", "stride_row": "i32"}
        specs += [
            AotSpec(f"masked_diffusion_loss_fwd_{ty}", masked_diffusion_loss_fwd_kernel,
                    {"logits_ptr": x, **common, "ce_ptr": w, "stats_ptr": w},
                    {"BLOCK_V": BLOCK_V}, NUM_WARPS, 3),
            AotSpec(f"masked_diffusion_loss_bwd_{ty}", masked_diffusion_loss_bwd_kernel,
                    {"grad_ce_ptr": w, "logits_ptr": x, **common, "stats_ptr": w, "grad_ptr": x},
                    {"BLOCK_V": BLOCK_V}, NUM_WARPS, 3),
            AotSpec(f"masked_diffusion_loss_fwd_bwd_{ty}", masked_diffusion_loss_fwd_bwd_kernel,
                    {"logits_ptr": x, **common, "ce_ptr": w},
                    {"BLOCK_V": BLOCK_V}, NUM_WARPS, 3),
        ]
    return specs


AOT_SPECS = _aot_specs()
