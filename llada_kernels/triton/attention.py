"""Attention with structured masks in Triton: FlashAttention-2 forward and backward with the
O(L) mask description of llada_kernels/masks.py and grouped KV heads. Registered as
llada::attention_{fwd,bwd}_triton.

The mask (ATTN_MASK_SPEC.md): query i sees key j iff qdoc(i) == kdoc(j) and
lo(j) <= level(i) <= hi(j), from q_mask [B, 2, Lq] = (qdoc, level) and k_mask [B, 3, Lk] =
(kdoc, lo, hi), int32. Every (query tile, key tile) pair is classified from the tiles' minima
and maxima before anything else is loaded:
    skip     max(qdoc) < min(kdoc), max(kdoc) < min(qdoc), max(level) < min(lo) or
             min(level) > max(hi): no query of the tile sees a key of the tile;
    full     one document on both sides, max(lo) <= min(level) and max(level) <= min(hi), and
             no key past Lk: every query sees every key, no per-element mask;
    partial  otherwise: the per-element rule is evaluated first, and a tile in which it holds
             nowhere is skipped too (the conservative rule cannot see, e.g., that clean
             queries never see the noisy keys of the diagonal tiles of the 2L mask).
Skipped tiles cost a few integer loads: no K, V, Q or dO load and no dot product, forward or
backward. Keys past Lk are loaded as (lo, hi) = (INT_MAX, -INT_MAX), seen by no level. Without
a mask (HAS_MASK = False) every tile is full except the last, partial one.

Per (batch b, query head h, KV head h // G), with S = scale Q K^T where visible, -inf elsewhere:

forward, one program per BLOCK_M queries, walking the key tiles with an online softmax
(base 2: t = S log2 e, so exp becomes exp2):
    m' = max(m, rowmax t),  l' = l 2^(m - m') + rowsum 2^(t - m'),
    acc' = acc 2^(m - m') + 2^(t - m') V
    O = acc / l,   lse = (m + log2 l) ln 2        (natural log, +inf for a row with no key)
In a partial tile a row may see no key yet (m' = -inf); it then uses 0 in place of m' so that
no -inf - -inf appears.

backward, recomputing P = exp(S - lse) from the saved lse, with delta_i = sum_d dO_id O_id:
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = scale dS^T Q,   dQ = scale dS K
in two kernels that own their outputs (no atomics): one program per BLOCK_N keys accumulates
dK, dV over the G query heads of its group and every query tile; one program per BLOCK_M
queries accumulates dQ over the key tiles. A row with no key has lse = +inf, hence P = 0.

All products accumulate in fp32; P and dS are rounded to the input dtype before their dot
products (as FlashAttention does). Two Triton 3.8 interpreter traps are worked around under
TRITON_INTERPRET=1 (the INTERPRET constexpr; compiled kernels are unaffected): bf16 x bf16
tl.dot returns garbage, so dot operands are upcast to fp32 (exactly: the values are already
rounded); and fp32 -> bf16 conversion truncates instead of rounding to nearest even, so _to
rounds the bits first.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _backend
from ._aot import AotSpec

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


# ---- the mask: loads, tile statistics, classification ------------------------------------

@triton.jit
def _load_q_mask(QM, b, rows, row_ok, Lq):
    """(qdoc, level) [BLOCK_M] of the query rows (0 past Lq)."""
    base = QM + b * 2 * Lq
    return (tl.load(base + rows, mask=row_ok, other=0),
            tl.load(base + Lq + rows, mask=row_ok, other=0))


@triton.jit
def _load_k_mask(KM, b, cols, col_ok, Lk):
    """(kdoc, lo, hi) [BLOCK_N] of the key columns; past Lk a key no level sees."""
    base = KM + b * 3 * Lk
    return (tl.load(base + cols, mask=col_ok, other=0),
            tl.load(base + Lk + cols, mask=col_ok, other=2147483647),
            tl.load(base + 2 * Lk + cols, mask=col_ok, other=-2147483647))


@triton.jit
def _lo(x, ok):
    """min of x where ok (INT_MAX where nothing is)."""
    return tl.min(tl.where(ok, x, 2147483647), axis=0)


@triton.jit
def _hi(x, ok):
    """max of x where ok (-INT_MAX where nothing is: a max can only come out too large, which
    keeps the classification conservative)."""
    return tl.max(tl.where(ok, x, -2147483647), axis=0)


@triton.jit
def _classify(qd_lo, qd_hi, lv_lo, lv_hi, kdoc, lo, hi, col_ok):
    """(skip, full) of a tile pair from the query tile's statistics and the key tile's mask."""
    kd_lo = _lo(kdoc, col_ok)
    kd_hi = _hi(kdoc, col_ok)
    skip = (qd_hi < kd_lo) | (kd_hi < qd_lo) | (lv_hi < tl.min(lo, axis=0)) \
        | (lv_lo > tl.max(hi, axis=0))
    full = (qd_lo == qd_hi) & (kd_lo == kd_hi) & (qd_lo == kd_lo) \
        & (tl.max(lo, axis=0) <= lv_lo) & (lv_hi <= tl.min(hi, axis=0))
    return skip, full


@triton.jit
def _visible(qdoc, level, kdoc, lo, hi):
    """[BLOCK_M, BLOCK_N] bool: query i sees key j."""
    return (qdoc[:, None] == kdoc[None, :]) & (lo[None, :] <= level[:, None]) \
        & (level[:, None] <= hi[None, :])


@triton.jit
def _visible_t(qdoc, level, kdoc, lo, hi):
    """[BLOCK_N, BLOCK_M] bool: key j (row) is seen by query i (column)."""
    return (kdoc[:, None] == qdoc[None, :]) & (lo[:, None] <= level[None, :]) \
        & (level[None, :] <= hi[:, None])


@triton.jit
def _any(vis):
    return tl.max(tl.max(vis.to(tl.int32), axis=1), axis=0) > 0


# ---- forward -----------------------------------------------------------------------------

@triton.jit
def _tile_mask(x, qdoc, level, kdoc, lo, hi, col_ok, MASK: tl.constexpr, fill):
    """x [BLOCK_M, BLOCK_N] where query i sees key j, else fill. MASK: 0 nothing to mask,
    1 the keys past Lk, 2 the structured mask. The mask is recomputed here, after the dot
    products, rather than kept live across them (registers)."""
    if MASK == 1:
        x = tl.where(col_ok[None, :], x, fill)
    elif MASK == 2:
        x = tl.where(_visible(qdoc, level, kdoc, lo, hi), x, fill)
    return x


@triton.jit
def _fwd_tile(q, k_base, v_base, cols, col_ok, qdoc, level, kdoc, lo, hi, m_i, l_i, acc,
              qk_scale, stride_kl, stride_vl, offs_d, MASK: tl.constexpr, INTERPRET: tl.constexpr):
    """One key tile of the online softmax (MASK as in _tile_mask)."""
    c64 = cols.to(tl.int64)
    kt = tl.load(k_base + c64[None, :] * stride_kl + offs_d[:, None],
                 mask=col_ok[None, :], other=0.0)                           # K^T [D, BLOCK_N]
    v = tl.load(v_base + c64[:, None] * stride_vl + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)                            # [BLOCK_N, D]
    t = tl.dot(q, _operand(kt, INTERPRET)) * qk_scale
    t = _tile_mask(t, qdoc, level, kdoc, lo, hi, col_ok, MASK, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(t, axis=1))
    if MASK == 2:  # a row that has seen no key yet: 0 in place of -inf (p and alpha are then 0)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(t - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    acc += tl.dot(_operand(_to(p, v.dtype, INTERPRET), INTERPRET), _operand(v, INTERPRET))
    return m_new, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, QM, KM, Out, Lse,           # Q, Out [B, Hq, Lq, D]; K, V [B, Hkv, Lk, D]
                                         # QM [B, 2, Lq], KM [B, 3, Lk] i32; Lse [B, Hq, Lq] fp32
    qk_scale,                            # scale * log2(e)
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    Hq, G, Lq, Lk,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERPRET: tl.constexpr,
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
    if HAS_MASK:
        qdoc, level = _load_q_mask(QM, b, rows, row_ok, Lq)
        qd_lo, qd_hi = _lo(qdoc, row_ok), _hi(qdoc, row_ok)
        lv_lo, lv_hi = _lo(level, row_ok), _hi(level, row_ok)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < Lk
        if HAS_MASK:
            kdoc, lo, hi = _load_k_mask(KM, b, cols, col_ok, Lk)
            skip, full = _classify(qd_lo, qd_hi, lv_lo, lv_hi, kdoc, lo, hi, col_ok)
            if full & (n0 + BLOCK_N <= Lk):
                m_i, l_i, acc = _fwd_tile(q, k_base, v_base, cols, col_ok, qdoc, level, kdoc, lo,
                                          hi, m_i, l_i, acc, qk_scale, stride_kl, stride_vl,
                                          offs_d, 0, INTERPRET)
            elif skip == 0:
                if _any(_visible(qdoc, level, kdoc, lo, hi)):
                    m_i, l_i, acc = _fwd_tile(q, k_base, v_base, cols, col_ok, qdoc, level, kdoc,
                                              lo, hi, m_i, l_i, acc, qk_scale, stride_kl,
                                              stride_vl, offs_d, 2, INTERPRET)
        else:
            if n0 + BLOCK_N <= Lk:
                m_i, l_i, acc = _fwd_tile(q, k_base, v_base, cols, col_ok, 0, 0, 0, 0, 0, m_i,
                                          l_i, acc, qk_scale, stride_kl, stride_vl, offs_d, 0,
                                          INTERPRET)
            else:
                m_i, l_i, acc = _fwd_tile(q, k_base, v_base, cols, col_ok, 0, 0, 0, 0, 0, m_i,
                                          l_i, acc, qk_scale, stride_kl, stride_vl, offs_d, 1,
                                          INTERPRET)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   float("inf"))
    o_off = bh * Lq * D + rows.to(tl.int64)[:, None] * D + offs_d[None, :]  # Out is contiguous
    tl.store(Out + o_off, _to(out, Out.dtype.element_ty, INTERPRET), mask=row_ok[:, None])
    tl.store(Lse + bh * Lq + rows, lse, mask=row_ok)


# ---- backward ----------------------------------------------------------------------------

@triton.jit
def _bwd_delta_kernel(
    Out, dO, dLse, Delta,                # Out, dO [B, Hq, Lq, D]; dLse, Delta [B, Hq, Lq] fp32
    stride_ob, stride_oh, stride_ol,
    stride_gb, stride_gh, stride_gl,
    Hq, Lq,
    D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
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
    if HAS_DLSE:  # the gradient of the returned lse: d lse_i / d s_ij = p_ij, so dS gains p dLse
        delta -= tl.load(dLse + bh * Lq + rows, mask=rows < Lq, other=0.0)
    tl.store(Delta + bh * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _dkdv_tile(k, v, q_base, g_base, lse_base, delta_base, rows, r_ok, qdoc, level, kdoc, lo, hi,
               dk, dv, qk_scale, stride_ql, stride_gl, offs_d, MASKED: tl.constexpr,
               INTERPRET: tl.constexpr):
    """One query tile's contribution to dK, dV; with MASKED the structured mask (transposed:
    keys along rows) is applied."""
    r64 = rows.to(tl.int64)
    # Q^T [D, BLOCK_M], dO [BLOCK_M, D]; query rows past Lq get lse = +inf, hence P = 0.
    qt = tl.load(q_base + r64[None, :] * stride_ql + offs_d[:, None], mask=r_ok[None, :], other=0.0)
    do = tl.load(g_base + r64[:, None] * stride_gl + offs_d[None, :], mask=r_ok[:, None], other=0.0)
    lse = tl.load(lse_base + rows, mask=r_ok, other=float("inf"))
    delta = tl.load(delta_base + rows, mask=r_ok, other=0.0)
    tt = tl.dot(k, _operand(qt, INTERPRET)) * qk_scale                      # [BLOCK_N, BLOCK_M]
    pt = tl.exp2(tt - (lse * 1.4426950408889634)[None, :])                  # P^T
    if MASKED:
        pt = tl.where(_visible_t(qdoc, level, kdoc, lo, hi), pt, 0.0)
    dv += tl.dot(_operand(_to(pt, do.dtype, INTERPRET), INTERPRET), _operand(do, INTERPRET))
    dpt = tl.dot(v, _operand(tl.trans(do), INTERPRET))
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(_operand(_to(dst, qt.dtype, INTERPRET), INTERPRET),
                 _operand(tl.trans(qt), INTERPRET))
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, QM, KM, dO, Lse, Delta, dK, dV,   # dK, dV [B, Hkv, Lk, D] contiguous
    scale, qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl,
    Hq, Hkv, G, Lq, Lk,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // Hkv, bhk % Hkv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = cols < Lk
    c64 = cols.to(tl.int64)[:, None]
    k = tl.load(K + b * stride_kb + hk * stride_kh + c64 * stride_kl + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + c64 * stride_vl + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    k = _operand(k, INTERPRET)
    v = _operand(v, INTERPRET)
    if HAS_MASK:
        kdoc, lo, hi = _load_k_mask(KM, b, cols, col_ok, Lk)

    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * stride_qb + h * stride_qh
        g_base = dO + b * stride_gb + h * stride_gh
        lse_base = Lse + (b * Hq + h) * Lq
        delta_base = Delta + (b * Hq + h) * Lq
        for m0 in range(0, Lq, BLOCK_M):
            rows = m0 + offs_m
            r_ok = rows < Lq
            if HAS_MASK:
                qdoc, level = _load_q_mask(QM, b, rows, r_ok, Lq)
                skip, full = _classify(_lo(qdoc, r_ok), _hi(qdoc, r_ok), _lo(level, r_ok),
                                       _hi(level, r_ok), kdoc, lo, hi, col_ok)
                if full:
                    dk, dv = _dkdv_tile(k, v, q_base, g_base, lse_base, delta_base, rows, r_ok,
                                        qdoc, level, kdoc, lo, hi, dk, dv, qk_scale, stride_ql,
                                        stride_gl, offs_d, False, INTERPRET)
                elif skip == 0:
                    if _any(_visible_t(qdoc, level, kdoc, lo, hi)):
                        dk, dv = _dkdv_tile(k, v, q_base, g_base, lse_base, delta_base, rows,
                                            r_ok, qdoc, level, kdoc, lo, hi, dk, dv, qk_scale,
                                            stride_ql, stride_gl, offs_d, True, INTERPRET)
            else:
                # Without a mask every pair is seen; keys past Lk are not stored.
                dk, dv = _dkdv_tile(k, v, q_base, g_base, lse_base, delta_base, rows, r_ok,
                                    0, 0, 0, 0, 0, dk, dv, qk_scale, stride_ql, stride_gl, offs_d,
                                    False, INTERPRET)
    off = bhk * Lk * D + c64 * D + offs_d[None, :]
    tl.store(dK + off, _to(dk * scale, dK.dtype.element_ty, INTERPRET), mask=col_ok[:, None])
    tl.store(dV + off, _to(dv, dV.dtype.element_ty, INTERPRET), mask=col_ok[:, None])


@triton.jit
def _dq_tile(q, do, lse2, delta, k_base, v_base, cols, col_ok, qdoc, level, kdoc, lo, hi, dq,
             qk_scale, stride_kl, stride_vl, offs_d, MASK: tl.constexpr, INTERPRET: tl.constexpr):
    """One key tile's contribution to dQ (MASK as in _tile_mask)."""
    c64 = cols.to(tl.int64)
    kt = tl.load(k_base + c64[None, :] * stride_kl + offs_d[:, None],
                 mask=col_ok[None, :], other=0.0)                           # K^T [D, BLOCK_N]
    vt = tl.load(v_base + c64[None, :] * stride_vl + offs_d[:, None],
                 mask=col_ok[None, :], other=0.0)                           # V^T [D, BLOCK_N]
    t = tl.dot(q, _operand(kt, INTERPRET)) * qk_scale
    p = _tile_mask(tl.exp2(t - lse2[:, None]), qdoc, level, kdoc, lo, hi, col_ok, MASK, 0.0)
    dp = tl.dot(do, _operand(vt, INTERPRET))
    ds = p * (dp - delta[:, None])
    dq += tl.dot(_operand(_to(ds, kt.dtype, INTERPRET), INTERPRET),
                 _operand(tl.trans(kt), INTERPRET))
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, QM, KM, dO, Lse, Delta, dQ,     # dQ [B, Hq, Lq, D] contiguous
    scale, qk_scale,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_gb, stride_gh, stride_gl,
    Hq, G, Lq, Lk,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERPRET: tl.constexpr,
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
    if HAS_MASK:
        qdoc, level = _load_q_mask(QM, b, rows, r_ok, Lq)
        qd_lo, qd_hi = _lo(qdoc, r_ok), _hi(qdoc, r_ok)
        lv_lo, lv_hi = _lo(level, r_ok), _hi(level, r_ok)

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, Lk, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < Lk
        if HAS_MASK:
            kdoc, lo, hi = _load_k_mask(KM, b, cols, c_ok, Lk)
            skip, full = _classify(qd_lo, qd_hi, lv_lo, lv_hi, kdoc, lo, hi, c_ok)
            if full & (n0 + BLOCK_N <= Lk):
                dq = _dq_tile(q, do, lse2, delta, k_base, v_base, cols, c_ok, qdoc, level, kdoc,
                              lo, hi, dq, qk_scale, stride_kl, stride_vl, offs_d, 0, INTERPRET)
            elif skip == 0:
                if _any(_visible(qdoc, level, kdoc, lo, hi)):
                    dq = _dq_tile(q, do, lse2, delta, k_base, v_base, cols, c_ok, qdoc, level,
                                  kdoc, lo, hi, dq, qk_scale, stride_kl, stride_vl, offs_d, 2,
                                  INTERPRET)
        else:
            if n0 + BLOCK_N <= Lk:
                dq = _dq_tile(q, do, lse2, delta, k_base, v_base, cols, c_ok, 0, 0, 0, 0, 0, dq,
                              qk_scale, stride_kl, stride_vl, offs_d, 0, INTERPRET)
            else:
                dq = _dq_tile(q, do, lse2, delta, k_base, v_base, cols, c_ok, 0, 0, 0, 0, 0, dq,
                              qk_scale, stride_kl, stride_vl, offs_d, 1, INTERPRET)
    tl.store(dQ + bh * Lq * D + r64 * D + offs_d[None, :], _to(dq * scale, dQ.dtype.element_ty, INTERPRET),
             mask=r_ok[:, None])


# ---- launch configurations: the only ones used, and the ones compiled ahead of time ------

def _config(kernel: str, D: int, masked: bool = False) -> tuple[dict, int, int]:
    """(block sizes, num_warps, num_stages) of `kernel` at head dim D, with or without a
    structured mask. Chosen so that every configuration compiles without register spills for
    sm_80 and sm_90 under every supported Triton (3.6 and 3.8, whose ptxas differ; AOT_SPECS).
    The mask costs registers: each thread holds (kdoc, lo, hi) for its columns of the MMA
    tile, so the masked kernels take narrower key tiles (at the unmasked sizes they spill
    24-660 bytes). dK/dV takes 16 query rows per step everywhere (64 spills at D = 32 on sm_80
    under Triton 3.6), and so does dQ 32 keys at D = 64."""
    if kernel == "fwd":
        if masked:
            if D >= 64:
                return {"BLOCK_M": 128, "BLOCK_N": 32}, 8, 3
            return {"BLOCK_M": 64, "BLOCK_N": 32 if D == 32 else 64}, 4, 3
        if D >= 64:
            return {"BLOCK_M": 128, "BLOCK_N": 64}, 8, 3
        return {"BLOCK_M": 64, "BLOCK_N": 64}, 4, 3
    if kernel == "delta":
        return {"BLOCK_M": 16}, 4, 1
    if kernel == "dkdv":
        return {"BLOCK_M": 16, "BLOCK_N": 64}, 8 if D == 128 else 4, 2
    if kernel == "dq":
        if D == 128:
            return ({"BLOCK_M": 32, "BLOCK_N": 32}, 8, 2) if masked else \
                ({"BLOCK_M": 64, "BLOCK_N": 16}, 8, 2)
        return {"BLOCK_M": 64, "BLOCK_N": 32 if masked or D == 64 else 64}, 4, 2
    raise KeyError(kernel)


def tile_sizes(D: int, masked: bool = True) -> dict[str, tuple[int, int]]:
    """(query tile, key tile) of each kernel at head dim D, for tile counts in benchmarks."""
    return {kernel: (blocks["BLOCK_M"], blocks["BLOCK_N"])
            for kernel in ("fwd", "dkdv", "dq") for blocks in [_config(kernel, D, masked)[0]]}


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _masks(q_mask, k_mask, device):
    """The mask pointers: the tensors, or a placeholder when there is no mask (HAS_MASK off)."""
    if q_mask is None:
        dummy = torch.empty(0, dtype=torch.int32, device=device)
        return dummy, dummy, False
    return q_mask, k_mask, True


def _fwd(q, k, v, q_mask, k_mask, scale):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out.zero_(), lse.fill_(math.inf)
    qm, km, has_mask = _masks(q_mask, k_mask, q.device)
    blocks, warps, stages = _config("fwd", D, has_mask)
    grid = (triton.cdiv(Lq, blocks["BLOCK_M"]), B * Hq)
    _fwd_kernel[grid](q, k, v, qm, km, out, lse, scale * LOG2E, *_strides(q), *_strides(k),
                      *_strides(v), Hq, Hq // Hkv, Lq, Lk, D=D, HAS_MASK=has_mask,
                      INTERPRET=_backend.interpreting(), **blocks, num_warps=warps,
                      num_stages=stages)
    return out, lse


def _bwd(grad_out, q, k, v, q_mask, k_mask, out, lse, scale, grad_lse=None):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    qm, km, has_mask = _masks(q_mask, k_mask, q.device)
    interp = _backend.interpreting()

    blocks, warps, stages = _config("delta", D)
    dlse = None if grad_lse is None else grad_lse.contiguous()
    _bwd_delta_kernel[(triton.cdiv(Lq, blocks["BLOCK_M"]), B * Hq)](
        out, grad_out, delta if dlse is None else dlse, delta, *_strides(out), *_strides(grad_out),
        Hq, Lq, D=D, **blocks, HAS_DLSE=dlse is not None, num_warps=warps, num_stages=stages)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    blocks, warps, stages = _config("dkdv", D, has_mask)
    _bwd_dkdv_kernel[(triton.cdiv(Lk, blocks["BLOCK_N"]), B * Hkv)](
        q, k, v, qm, km, grad_out, lse, delta, dk, dv, scale, scale * LOG2E, *strides,
        Hq, Hkv, Hq // Hkv, Lq, Lk, D=D, HAS_MASK=has_mask, INTERPRET=interp, **blocks,
        num_warps=warps, num_stages=stages)
    blocks, warps, stages = _config("dq", D, has_mask)
    _bwd_dq_kernel[(triton.cdiv(Lq, blocks["BLOCK_M"]), B * Hq)](
        q, k, v, qm, km, grad_out, lse, delta, dq, scale, scale * LOG2E, *strides,
        Hq, Hq // Hkv, Lq, Lk, D=D, HAS_MASK=has_mask, INTERPRET=interp, **blocks,
        num_warps=warps, num_stages=stages)
    return dq, dk, dv


for _device in ("cuda", "cpu"):  # cpu: CPU tensors under TRITON_INTERPRET=1
    torch.library.register_kernel("llada::attention_fwd_triton", _device)(_fwd)
    torch.library.register_kernel("llada::attention_bwd_triton", _device)(_bwd)


# ---- ahead-of-time compilation: every configuration the launchers above use -------------

def _aot_specs():
    specs = []
    i32, f32 = "i32", "fp32"
    for dtype in ("bf16", "fp16"):
        ptr = f"*{dtype}"
        for D in HEAD_DIMS:
            blocks, warps, stages = _config("delta", D)
            sig = {"Out": ptr, "dO": ptr, "dLse": "*fp32", "Delta": "*fp32",
                   **{f"stride_{t}{d}": i32 for t in "og" for d in "bhl"}, "Hq": i32, "Lq": i32}
            for has_dlse in (False, True):
                specs.append(AotSpec(f"attn_bwd_delta_{dtype}_d{D}" + ("_dlse" if has_dlse else ""),
                                     _bwd_delta_kernel, sig,
                                     {"D": D, **blocks, "HAS_DLSE": has_dlse}, warps, stages))
            for has_mask in (True, False):
                tag = f"{dtype}_d{D}" + ("_masked" if has_mask else "")
                common = {"Q": ptr, "K": ptr, "V": ptr, "QM": "*i32", "KM": "*i32"}
                blocks, warps, stages = _config("fwd", D, has_mask)
                sig = {**common, "Out": ptr, "Lse": "*fp32", "qk_scale": f32,
                       **{f"stride_{t}{d}": i32 for t in "qkv" for d in "bhl"},
                       "Hq": i32, "G": i32, "Lq": i32, "Lk": i32}
                const = {"D": D, "HAS_MASK": has_mask, "INTERPRET": False}
                specs.append(AotSpec(f"attn_fwd_{tag}", _fwd_kernel, sig, {**const, **blocks},
                                     warps, stages))
                common = {**common, "dO": ptr, "Lse": "*fp32", "Delta": "*fp32"}
                strides = {f"stride_{t}{d}": i32 for t in "qkvg" for d in "bhl"}
                blocks, warps, stages = _config("dkdv", D, has_mask)
                sig = {**common, "dK": ptr, "dV": ptr, "scale": f32, "qk_scale": f32, **strides,
                       "Hq": i32, "Hkv": i32, "G": i32, "Lq": i32, "Lk": i32}
                specs.append(AotSpec(f"attn_bwd_dkdv_{tag}", _bwd_dkdv_kernel, sig,
                                     {**const, **blocks}, warps, stages))
                blocks, warps, stages = _config("dq", D, has_mask)
                sig = {**common, "dQ": ptr, "scale": f32, "qk_scale": f32, **strides,
                       "Hq": i32, "G": i32, "Lq": i32, "Lk": i32}
                specs.append(AotSpec(f"attn_bwd_dq_{tag}", _bwd_dq_kernel, sig,
                                     {**const, **blocks}, warps, stages))
    return specs


AOT_SPECS = _aot_specs()
