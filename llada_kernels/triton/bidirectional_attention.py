"""Bidirectional attention in Triton: FlashAttention-2 forward and backward with key-padding
masks and grouped KV heads. Registered as llada::bidirectional_attention_{fwd,bwd}_triton.

Per (batch b, query head h, KV head h // G), with S = scale Q K^T + bias, bias_j = 0 for an
attended key and -inf for a padded one:

forward, one program per BLOCK_M queries, walking the key tiles with an online softmax
(base 2: t = S log2 e, so exp becomes exp2):
    m' = max(m, rowmax t),  l' = l 2^(m - m') + rowsum 2^(t - m'),
    acc' = acc 2^(m - m') + 2^(t - m') V
    O = acc / l,   lse = (m + log2 l) ln 2        (natural log, +inf for a row with no key)
A key tile whose keys are all padded is skipped (the mask row is shared by every query row).

backward, recomputing P = exp(S - lse) from the saved lse, with delta_i = sum_d dO_id O_id:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = scale dS^T Q,   dQ = scale dS K
in two kernels that own their outputs (no atomics): one program per BLOCK_N keys accumulates
dK, dV over the G query heads of its group and every query tile; one program per BLOCK_M
queries accumulates dQ over the key tiles.

All products accumulate in fp32; P and dS are rounded to the input dtype before their dot
products (as FlashAttention does). Two Triton 3.8 interpreter traps are worked around under
TRITON_INTERPRET=1 (the INTERPRET constexpr; compiled kernels are unaffected): bf16 x bf16
tl.dot returns garbage, so dot operands are upcast to fp32 (exactly: the values are already
rounded); and fp32 -> bf16 conversion truncates instead of rounding to nearest even, so _to
rounds the bits first.
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch
import triton
import triton.language as tl

from .. import _backend

try:
    from ._aot import AotSpec
except ImportError:  # the shared definition lands with the triton-remask branch
    AotSpec = namedtuple("AotSpec", "name fn signature constexprs num_warps num_stages")

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _operand(x, INTERPRET: tl.constexpr):
    """A tl.dot operand: itself, or fp32 under the interpreter."""
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _to(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The GPU does; the interpreter truncates fp32 to
    bf16 (Triton 3.8), so there we round the fp32 bits first and truncation becomes exact."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _fwd_kernel(
    Q, K, V, Mask, Out, Lse,             # Q, Out [B, Hq, Lq, D]; K, V [B, Hkv, Lk, D]
                                         # Mask [B, Lk] u8; Lse [B, Hq, Lq] fp32
    qk_scale,                            # scale * log2(e)
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    Hq, G, Lq, Lk,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = rows < Lq

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_ql
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q = _operand(q, INTERPRET)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_row = Mask + b * Lk

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + offs_n
        keep = tl.load(mask_row + cols, mask=cols < Lk, other=0) != 0      # [BLOCK_N]
        if tl.max(keep.to(tl.int32), axis=0) > 0:                           # not all padding
            kt = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_kl + offs_d[:, None],
                         mask=(cols < Lk)[None, :], other=0.0)              # K^T [D, BLOCK_N]
            v = tl.load(v_base + cols.to(tl.int64)[:, None] * stride_vl + offs_d[None, :],
                        mask=(cols < Lk)[:, None], other=0.0)               # [BLOCK_N, D]
            t = tl.dot(q, _operand(kt, INTERPRET)) * qk_scale
            t = tl.where(keep[None, :], t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, axis=1))                      # finite: a key is kept
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(t - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc += tl.dot(_operand(_to(p, v.dtype, INTERPRET), INTERPRET), _operand(v, INTERPRET))
            m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   float("inf"))
    o_off = bh * Lq * D + rows.to(tl.int64)[:, None] * D + offs_d[None, :]  # Out is contiguous
    tl.store(Out + o_off, _to(out, Out.dtype.element_ty, INTERPRET), mask=row_ok[:, None])
    tl.store(Lse + bh * Lq + rows, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    Out, dO, Delta,                      # Out, dO [B, Hq, Lq, D]; Delta [B, Hq, Lq] fp32
    stride_ob, stride_oh, stride_ol,
    stride_gb, stride_gh, stride_gl,
    Hq, Lq,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    ok = (rows < Lq)[:, None]
    r64 = rows.to(tl.int64)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + r64 * stride_ol + offs_d[None, :],
                mask=ok, other=0.0)
    g = tl.load(dO + b * stride_gb + h * stride_gh + r64 * stride_gl + offs_d[None, :],
                mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
    tl.store(Delta + bh * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Mask, dO, Lse, Delta, dK, dV,   # dK, dV [B, Hkv, Lk, D] contiguous
    scale, qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl,
    Hq, Hkv, G, Lq, Lk,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // Hkv, bhk % Hkv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = cols < Lk
    c64 = cols.to(tl.int64)[:, None]
    keep = tl.load(Mask + b * Lk + cols, mask=col_ok, other=0) != 0

    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    if tl.max(keep.to(tl.int32), axis=0) > 0:                               # not all padding
        k = tl.load(K + b * stride_kb + hk * stride_kh + c64 * stride_kl + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + c64 * stride_vl + offs_d[None, :],
                    mask=col_ok[:, None], other=0.0)
        k = _operand(k, INTERPRET)
        v = _operand(v, INTERPRET)
        for g in range(0, G):
            h = hk * G + g
            q_base = Q + b * stride_qb + h * stride_qh
            g_base = dO + b * stride_gb + h * stride_gh
            row_base = (b * Hq + h) * Lq
            for m0 in range(0, Lq, BLOCK_M):
                rows = m0 + offs_m
                r_ok = rows < Lq
                # Q^T, dO^T [D, BLOCK_M]; padded query rows get lse = +inf, hence P = 0.
                qt = tl.load(q_base + rows.to(tl.int64)[None, :] * stride_ql + offs_d[:, None],
                             mask=r_ok[None, :], other=0.0)
                do = tl.load(g_base + rows.to(tl.int64)[:, None] * stride_gl + offs_d[None, :],
                             mask=r_ok[:, None], other=0.0)
                lse = tl.load(Lse + row_base + rows, mask=r_ok, other=float("inf"))
                delta = tl.load(Delta + row_base + rows, mask=r_ok, other=0.0)
                # P^T [BLOCK_N, BLOCK_M] = exp2(t^T - lse log2 e)
                tt = tl.dot(k, _operand(qt, INTERPRET)) * qk_scale
                pt = tl.where(keep[:, None], tl.exp2(tt - (lse * 1.4426950408889634)[None, :]), 0.0)
                dv += tl.dot(_operand(_to(pt, do.dtype, INTERPRET), INTERPRET), _operand(do, INTERPRET))
                dpt = tl.dot(v, _operand(tl.trans(do), INTERPRET))
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(_operand(_to(dst, qt.dtype, INTERPRET), INTERPRET),
                             _operand(tl.trans(qt), INTERPRET))
    off = bhk * Lk * D + c64 * D + offs_d[None, :]
    tl.store(dK + off, _to(dk * scale, dK.dtype.element_ty, INTERPRET), mask=col_ok[:, None])
    tl.store(dV + off, _to(dv, dV.dtype.element_ty, INTERPRET), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Mask, dO, Lse, Delta, dQ,       # dQ [B, Hq, Lq, D] contiguous
    scale, qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl,
    Hq, G, Lq, Lk,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // Hq, bh % Hq
    hk = h // G
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    r_ok = rows < Lq
    r64 = rows.to(tl.int64)[:, None]
    q = tl.load(Q + b * stride_qb + h * stride_qh + r64 * stride_ql + offs_d[None, :],
                mask=r_ok[:, None], other=0.0)
    do = tl.load(dO + b * stride_gb + h * stride_gh + r64 * stride_gl + offs_d[None, :],
                 mask=r_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + bh * Lq + rows, mask=r_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + bh * Lq + rows, mask=r_ok, other=0.0)
    q = _operand(q, INTERPRET)
    do = _operand(do, INTERPRET)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < Lk
        keep = tl.load(Mask + b * Lk + cols, mask=c_ok, other=0) != 0
        if tl.max(keep.to(tl.int32), axis=0) > 0:
            kt = tl.load(k_base + cols.to(tl.int64)[None, :] * stride_kl + offs_d[:, None],
                         mask=c_ok[None, :], other=0.0)                     # K^T [D, BLOCK_N]
            vt = tl.load(v_base + cols.to(tl.int64)[None, :] * stride_vl + offs_d[:, None],
                         mask=c_ok[None, :], other=0.0)                     # V^T [D, BLOCK_N]
            t = tl.dot(q, _operand(kt, INTERPRET)) * qk_scale
            p = tl.where(keep[None, :], tl.exp2(t - lse2[:, None]), 0.0)
            dp = tl.dot(do, _operand(vt, INTERPRET))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(_operand(_to(ds, kt.dtype, INTERPRET), INTERPRET), _operand(tl.trans(kt), INTERPRET))
    tl.store(dQ + bh * Lq * D + r64 * D + offs_d[None, :], _to(dq * scale, dQ.dtype.element_ty, INTERPRET),
             mask=r_ok[:, None])


# ---- launch configurations: the only ones used, and the ones compiled ahead of time ------

def _config(kernel: str, D: int) -> tuple[dict, int, int]:
    """(block sizes, num_warps, num_stages) of `kernel` at head dim D. Chosen so that every
    configuration compiles without register spills for sm_80 and sm_90 (AOT_SPECS), under
    every supported Triton (3.6 and 3.8: their ptxas differ)."""
    if kernel == "fwd":
        if D >= 64:
            return {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3
        return {"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3
    if kernel == "delta":
        return {"BLOCK_M": 16}, 4, 1
    if kernel == "dkdv":  # BLOCK_M 64 at D = 32 spills on sm_80 under Triton 3.6
        return {"BLOCK_M": 16, "BLOCK_N": 64}, 8 if D == 128 else 4, 2
    if kernel == "dq":
        if D == 128:
            return {"BLOCK_M": 64, "BLOCK_N": 16}, 8, 2
        # BLOCK_N 64 at D = 64 spills on sm_80 under Triton 3.6
        return {"BLOCK_M": 64, "BLOCK_N": 32 if D == 64 else 64}, 4, 2
    raise KeyError(kernel)


def _mask_u8(key_padding_mask, B, Lk, device):
    if key_padding_mask is None:
        return torch.ones((B, Lk), dtype=torch.uint8, device=device)
    return key_padding_mask.view(torch.uint8)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _fwd(q, k, v, key_padding_mask, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(math.inf)
    blocks, warps, stages = _config("fwd", D)
    grid = (triton.cdiv(Lq, blocks["BLOCK_M"]), B * Hq)
    _fwd_kernel[grid](q, k, v, _mask_u8(key_padding_mask, B, Lk, q.device), out, lse,
                      scale * LOG2E, *_strides(q), *_strides(k), *_strides(v),
                      Hq, Hq // Hkv, Lq, Lk, D=D, INTERPRET=_backend.interpreting(), **blocks,
                      num_warps=warps, num_stages=stages)
    return out, lse


def _bwd(grad_out, q, k, v, key_padding_mask, out, lse, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    mask = _mask_u8(key_padding_mask, B, Lk, q.device)
    interp = _backend.interpreting()

    blocks, warps, stages = _config("delta", D)
    _bwd_delta_kernel[(triton.cdiv(Lq, blocks["BLOCK_M"]), B * Hq)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), Hq, Lq, D=D, **blocks,
        num_warps=warps, num_stages=stages)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    blocks, warps, stages = _config("dkdv", D)
    _bwd_dkdv_kernel[(triton.cdiv(Lk, blocks["BLOCK_N"]), B * Hkv)](
        q, k, v, mask, grad_out, lse, delta, dk, dv, scale, scale * LOG2E, *strides,
        Hq, Hkv, Hq // Hkv, Lq, Lk, D=D, INTERPRET=interp, **blocks, num_warps=warps,
        num_stages=stages)
    blocks, warps, stages = _config("dq", D)
    _bwd_dq_kernel[(triton.cdiv(Lq, blocks["BLOCK_M"]), B * Hq)](
        q, k, v, mask, grad_out, lse, delta, dq, scale, scale * LOG2E, *strides,
        Hq, Hq // Hkv, Lq, Lk, D=D, INTERPRET=interp, **blocks, num_warps=warps,
        num_stages=stages)
    return dq, dk, dv


for _device in ("cuda", "cpu"):  # cpu: CPU tensors under TRITON_INTERPRET=1
    torch.library.register_kernel("llada::bidirectional_attention_fwd_triton", _device)(_fwd)
    torch.library.register_kernel("llada::bidirectional_attention_bwd_triton", _device)(_bwd)


# ---- ahead-of-time compilation: every configuration the launchers above use -------------

def _aot_specs():
    specs = []
    i32, f32 = "i32", "fp32"
    for dtype in ("bf16", "fp16"):
        ptr = f"*{dtype}"
        for D in HEAD_DIMS:
            blocks, warps, stages = _config("fwd", D)
            sig = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*u8", "Out": ptr, "Lse": "*fp32",
                   "qk_scale": f32, **{f"stride_{t}{d}": i32 for t in "qkv" for d in "bhl"},
                   "Hq": i32, "G": i32, "Lq": i32, "Lk": i32}
            specs.append(AotSpec(f"attn_fwd_{dtype}_d{D}", _fwd_kernel, sig,
                                 {"D": D, "INTERPRET": False, **blocks}, warps, stages))
            blocks, warps, stages = _config("delta", D)
            sig = {"Out": ptr, "dO": ptr, "Delta": "*fp32",
                   **{f"stride_{t}{d}": i32 for t in "og" for d in "bhl"}, "Hq": i32, "Lq": i32}
            specs.append(AotSpec(f"attn_bwd_delta_{dtype}_d{D}", _bwd_delta_kernel, sig,
                                 {"D": D, **blocks}, warps, stages))
            common = {"Q": ptr, "K": ptr, "V": ptr, "Mask": "*u8", "dO": ptr, "Lse": "*fp32",
                      "Delta": "*fp32"}
            strides = {f"stride_{t}{d}": i32 for t in "qkvg" for d in "bhl"}
            blocks, warps, stages = _config("dkdv", D)
            sig = {**common, "dK": ptr, "dV": ptr, "scale": f32, "qk_scale": f32, **strides,
                   "Hq": i32, "Hkv": i32, "G": i32, "Lq": i32, "Lk": i32}
            specs.append(AotSpec(f"attn_bwd_dkdv_{dtype}_d{D}", _bwd_dkdv_kernel, sig,
                                 {"D": D, "INTERPRET": False, **blocks}, warps, stages))
            blocks, warps, stages = _config("dq", D)
            sig = {**common, "dQ": ptr, "scale": f32, "qk_scale": f32, **strides,
                   "Hq": i32, "G": i32, "Lq": i32, "Lk": i32}
            specs.append(AotSpec(f"attn_bwd_dq_{dtype}_d{D}", _bwd_dq_kernel, sig,
                                 {"D": D, "INTERPRET": False, **blocks}, warps, stages))
    return specs


AOT_SPECS = _aot_specs()
