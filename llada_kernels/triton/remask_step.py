"""Triton kernels of llada::remask_step_triton: one LLaDA sampling step in two launches.

Semantics: llada_kernels.remask_step (docstring) and llada_kernels/reference/remask.py.
Contract shared with the C++ and CUDA kernels: csrc/common/random.h (noise, see _random.py)
and csrc/common/remask.h (selection keys and the per-row bound), restated here.

Kernel 1, _score_kernel: one program per position r = b * L + l.
    A candidate is x[b, l] == mask_id and l < block_end[b]; with editing (edit_threshold),
    an editable position with x[b, l] != mask_id is scored too. Any other position stores
    key = -1 and reads no logits. A scored position reads its logits row once, in BLOCK_V
    tiles, and keeps online:
        z      = cfg(logits) with suppress_ids at -inf        (un + w (cond - un), w = s + 1)
        x0     = the first NaN z_v, else the first +inf z_v (tracked apart: noise cannot
                 move them), else argmax_v min(z_v + T g_v, FLT_MAX) over the finite z_v
                 (g Gumbel; T = 0: no noise), ties -> lowest id; all -inf: first_allowed
        c      = z with zero_confidence_ids at -inf           (the confidence logits)
        m      = max_v c_v,  s = sum_v e^(c_v - m)             (rescaled when m grows)
        margin:  m2 = the second largest c_v (m itself when the max is repeated)
        entropy: t  = sum_v e^(c_v - m) (c_v - m),  rescaled on m -> m' as
                 t' = e^(m - m') (t + (m - m') s)
    and scores it, in fp32:
        low_confidence  p(x0) = e^(c_x0 - m) / s
        margin          p1 - p2 = (1 - e^(m2 - m)) / s
        entropy         sum p log p = t / s - log s
        random          u from Philox (random.h)
        0 where the formula gives NaN: every c_v -inf, or a NaN or +inf c_v (then s is NaN),
        as the reference's nan_to_num.
    A candidate stores x0 and key = (ordered(conf) << 31) | (2^31 - 1 - l), unique per row;
    an editable position stores x0 and key = -2 (edited: x0 != x and conf > edit_threshold
    in fp32) or -1.
    Stats mode (llada::remask_step_stats_triton, a vocabulary shard of ids [off, off + V)):
    ids are global, the tiles start at the even id at or below off (so that each Philox call
    still feeds an even and an odd id), and the program stores the statistics (y, m, s, aux)
    and x0 instead of the key (csrc/ops.cpp states them).

Kernel 2, _select_kernel: one program per row b, any L (BLOCK_L tiles).
    k = max(num_transfer[b], 0), c = #candidates,
    bound = -1 (k >= c) | INT64_MAX (k == 0) | the k-th largest key, found by a 63-step
    bitwise bisection: the largest tau with #(key >= tau) >= k, built from the high bit down;
    bound = min(bound, ordered(threshold) << 31);
    transfer = (key >= 0 and key >= bound) or key == -2 (edited);  x_new = transfer ? x0 : x.

No host synchronisation: the seed is read in-kernel, the special ids are cached on the device.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .._backend import interpreting
from ..reference.remask import first_allowed_id
from ._aot import AotSpec
from ._random import gumbel_tile, precise_log, remask_uniform

REMASKING = {"low_confidence": 0, "random": 1, "margin": 2, "entropy": 3}
_LOW_CONFIDENCE: tl.constexpr = tl.constexpr(0)
_RANDOM: tl.constexpr = tl.constexpr(1)
_MARGIN: tl.constexpr = tl.constexpr(2)
_ENTROPY: tl.constexpr = tl.constexpr(3)
INT64_MAX = 2**63 - 1

# The launch configurations, all listed in AOT_SPECS. Kernel 1: 8 elements per thread per
# tile (one 16-byte load of bf16), and 8 warps, because a step often has only a few dozen
# candidate positions, so each program must keep many loads in flight on its own.
SCORE_CONFIG = (2048, 8)  # (BLOCK_V, num_warps)
SELECT_CONFIG = (1024, 4)  # (BLOCK_L, num_warps)
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------

def remask_step_triton(logits, uncond_logits, cfg_scale, x, num_transfer, block_end, mask_id,
                       temperature, remasking, threshold, suppress_ids, zero_confidence_ids,
                       seed, edit_threshold=None, editable=None):
    """llada::remask_step_triton (schema in csrc/ops.cpp). Arguments were checked by
    llada_kernels.remask_step; logits (and uncond_logits) have unit stride along V."""
    B, L, V = logits.shape
    device = logits.device
    x_new = torch.empty((B, L), dtype=torch.int64, device=device)
    transfer = torch.empty((B, L), dtype=torch.bool, device=device)
    if B * L == 0:
        return x_new, transfer
    x0 = torch.empty((B, L), dtype=torch.int64, device=device)
    keys = torch.empty((B, L), dtype=torch.int64, device=device)
    _score(logits, uncond_logits, cfg_scale, x, block_end, mask_id, temperature, remasking,
           suppress_ids, zero_confidence_ids, seed, 0, x0, keys, None, edit_threshold, editable)
    block_l, select_warps = SELECT_CONFIG
    with _device_guard(device):
        _select_kernel[(B,)](
            keys, x0, x, num_transfer.contiguous(), x_new, transfer,
            L, x.stride(0), x.stride(1), _threshold_key(threshold),
            BLOCK_L=block_l, num_warps=select_warps)
    return x_new, transfer


def remask_step_stats_triton(logits, uncond_logits, cfg_scale, x, block_end, mask_id,
                             temperature, remasking, suppress_ids, zero_confidence_ids, seed,
                             vocab_offset):
    """llada::remask_step_stats_triton (schema in csrc/ops.cpp): kernel 1 in stats mode."""
    B, L, V = logits.shape
    stats = torch.zeros((B, L, 4), dtype=torch.float32, device=logits.device)
    x0 = torch.zeros((B, L), dtype=torch.int64, device=logits.device)
    if B * L:
        _score(logits, uncond_logits, cfg_scale, x, block_end, mask_id, temperature, remasking,
               suppress_ids, zero_confidence_ids, seed, vocab_offset, x0, None, stats)
    return stats, x0


def _score(logits, uncond_logits, cfg_scale, x, block_end, mask_id, temperature, remasking,
           suppress_ids, zero_confidence_ids, seed, vocab_offset, x0, keys, stats,
           edit_threshold=None, editable=None):
    """Launches kernel 1: keys, or (stats mode) stats, and x0."""
    B, L, V = logits.shape
    device = logits.device
    if device.type == "cpu" and not interpreting():
        raise RuntimeError("remask_step_triton: CPU tensors need TRITON_INTERPRET=1")
    if logits.stride(2) != 1 or (uncond_logits is not None and uncond_logits.stride(2) != 1):
        raise ValueError("remask_step_triton: logits and uncond_logits need unit stride along V "
                         f"(llada_kernels.remask_step ensures it); got strides {logits.stride()}"
                         f"{'' if uncond_logits is None else f' and {uncond_logits.stride()}'}")
    sample = temperature > 0
    if seed is None and (sample or remasking == "random"):
        raise ValueError("remask_step_triton: seed ([1] int64) is required when temperature > 0 "
                         f"or remasking == 'random'; got temperature={temperature}, "
                         f"remasking={remasking!r}")
    block_end = block_end.contiguous()
    lo, hi = vocab_offset, vocab_offset + V
    suppress = tuple(i for i in suppress_ids if lo <= i < hi)  # other shards' ids match nothing
    zero = tuple(i for i in zero_confidence_ids if lo <= i < hi)
    special, n_suppress = _special_ids(suppress, zero, device)
    first_allowed = first_allowed_id(suppress, lo)
    un = logits if uncond_logits is None else uncond_logits
    # Editing: 0 off, 1 every committed position, 2 those of `editable` (read with its strides).
    if editable is not None and (editable.dtype != torch.bool or editable.shape != x.shape):
        raise ValueError(f"remask_step_triton: editable must be bool [B, L] = {list(x.shape)}; "
                         f"got {editable.dtype} {list(editable.shape)}")
    if edit_threshold is not None and remasking != "low_confidence":
        raise ValueError("remask_step_triton: edit_threshold needs remasking='low_confidence'; "
                         f"got {remasking!r}")
    edit_mode = 0 if edit_threshold is None else 1 if editable is None else 2
    ed = torch.empty((1, 1), dtype=torch.bool, device=device) if editable is None else editable
    block_v, score_warps = SCORE_CONFIG
    with _device_guard(device):
        _score_kernel[(B * L,)](
            logits, un, x, block_end, special, block_end if seed is None else seed,
            x0, x0 if keys is None else keys,
            torch.empty(1, dtype=torch.float32, device=device) if stats is None else stats,
            L, V, logits.stride(0), logits.stride(1), un.stride(0), un.stride(1),
            x.stride(0), x.stride(1), ed, ed.stride(0), ed.stride(1), edit_mode,
            _fp32(edit_threshold), mask_id, float(cfg_scale) + 1.0, float(temperature), REMASKING[remasking],
            special.numel(), n_suppress, first_allowed if first_allowed < hi else -1,
            vocab_offset, int(stats is not None),  # int, not bool: Triton 3.6's interpreter
            HAS_CFG=uncond_logits is not None, SAMPLE=sample, BLOCK_V=block_v,
            num_warps=score_warps)


torch.library.register_kernel("llada::remask_step_triton", ("cuda", "cpu"), remask_step_triton)
torch.library.register_kernel("llada::remask_step_stats_triton", ("cuda", "cpu"),
                              remask_step_stats_triton)


@functools.lru_cache(maxsize=64)
def _special_ids(suppress, zero_confidence, device):
    """[suppress..., zero_confidence...] int64 on `device`, and the suppress count. Cached: a
    host-to-device copy synchronises, and these lists rarely change between steps."""
    ids = list(suppress) + list(zero_confidence)
    return torch.tensor(ids or [0], dtype=torch.int64, device=device)[:len(ids)], len(suppress)


def _fp32(value):
    """value rounded to fp32 (0 for None), as a Python float: the kernel compares in fp32."""
    return 0.0 if value is None else torch.tensor(value, dtype=torch.float32).item()


def _threshold_key(threshold):
    """ordered(fp32(threshold)) << 31, or INT64_MAX (no effect on the bound) without one."""
    if threshold is None:
        return INT64_MAX
    bits = torch.tensor(threshold, dtype=torch.float32).view(torch.int32).item() & 0xFFFFFFFF
    ordered = (~bits & 0xFFFFFFFF) if bits & 0x80000000 else bits | 0x80000000
    return ordered << 31


def _device_guard(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# Kernel 1: choose and score every candidate position
# --------------------------------------------------------------------------------------------

@triton.jit
def _score_kernel(
    logits_ptr, uncond_ptr,  # [B, L, V] fp32/bf16/fp16, unit stride along V
    x_ptr,  # [B, L] int64, strided
    block_end_ptr,  # [B] int64
    special_ids_ptr,  # [n_special] int64: the suppress ids, then the zero-confidence ids
    seed_ptr,  # [1] int64
    x0_ptr, key_ptr,  # [B, L] int64 outputs, contiguous
    stats_ptr,  # [B, L, 4] fp32 output in stats mode (else unused)
    L: tl.int64, V: tl.int64,
    stride_lb: tl.int64, stride_ll: tl.int64, stride_ub: tl.int64, stride_ul: tl.int64,
    stride_xb: tl.int64, stride_xl: tl.int64,
    editable_ptr,  # [B, L] bool, strided (read when edit_mode == 2)
    stride_eb: tl.int64, stride_el: tl.int64,
    edit_mode: tl.int32,  # 0 no editing, 1 every committed position editable, 2 editable_ptr's
    edit_threshold: tl.float32,
    mask_id: tl.int64,
    cfg_weight: tl.float32,  # cfg_scale + 1
    temperature: tl.float32,
    remasking: tl.int32,  # REMASKING
    n_special: tl.int32, n_suppress: tl.int32,
    first_allowed: tl.int64,  # the lowest id not suppressed: x0 of a row of -inf (-1: none)
    vocab_offset: tl.int64,  # the global id of the logits' first column (0 but for a shard)
    stats_mode: tl.int32,  # store stats and x0 (llada::remask_step_stats_triton), not keys
    HAS_CFG: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # the position b * L + l, also the noise stream
    b = r // L
    l = r - b * L
    token = tl.load(x_ptr + b * stride_xb + l * stride_xl)
    end = tl.load(block_end_ptr + b)
    key = tl.full((), -1, tl.int64)  # not a candidate
    candidate = (token == mask_id) & (l < end)
    to_edit = (edit_mode != 0) & (token != mask_id)
    if edit_mode == 2:
        to_edit = to_edit & (tl.load(editable_ptr + b * stride_eb + l * stride_el) != 0)
    if candidate | to_edit:
        seed = tl.load(seed_ptr)
        row = logits_ptr + b * stride_lb + l * stride_ll
        urow = uncond_ptr + b * stride_ub + l * stride_ul
        offs = tl.arange(0, BLOCK_V)
        NEG_INF = float("-inf")
        INF = float("inf")
        FLT_MAX = 3.4028234663852886e38
        best = tl.full((), NEG_INF, tl.float32)  # max of the finite choice logits z + T g
        x0 = tl.full((), 0, tl.int64)
        # Global ids [lo, hi), tiles from the even id lo: Philox pairs stay (2j, 2j + 1).
        hi = vocab_offset + V
        lo = vocab_offset - vocab_offset % 2
        first_code = 2 * hi  # min over ids of: id (z NaN), hi + id (z = +inf), 2 hi (otherwise)
        c_x0 = tl.full((), NEG_INF, tl.float32)  # x0's confidence logit
        m = tl.full((), NEG_INF, tl.float32)
        m2 = tl.full((), NEG_INF, tl.float32)
        s = tl.full((), 0.0, tl.float32)
        t = tl.full((), 0.0, tl.float32)
        for v0 in range(lo, hi, BLOCK_V):
            ids = v0 + offs
            in_vocab = (ids >= vocab_offset) & (ids < hi)
            z = tl.load(row + (ids - vocab_offset), mask=in_vocab, other=0.0).to(tl.float32)
            if HAS_CFG:
                un = tl.load(urow + (ids - vocab_offset), mask=in_vocab, other=0.0).to(tl.float32)
                z = un + cfg_weight * (z - un)
            z = tl.where(in_vocab, z, NEG_INF)
            c = z
            for i in range(n_special):
                hit = ids == tl.load(special_ids_ptr + i)
                z = tl.where(hit & (i < n_suppress), NEG_INF, z)
                c = tl.where(hit, NEG_INF, c)

            # x0: the first NaN, then the first +inf, apart; then a running argmax of the
            # finite choice logits (a later tile must be strictly better).
            code = tl.where(z != z, ids, tl.where(z == INF, hi + ids, 2 * hi))
            first_code = tl.minimum(first_code, tl.min(code, axis=0))
            finite_z = tl.where(tl.abs(z) < INF, z, NEG_INF)
            if SAMPLE:
                choice = tl.minimum(finite_z + temperature * gumbel_tile(seed, r, v0, BLOCK_V), FLT_MAX)
            else:
                choice = finite_z
            tile_best, tile_arg = tl.max(choice, axis=0, return_indices=True,
                                         return_indices_tie_break_left=True)
            tile_c = tl.max(tl.where(offs == tile_arg, c, NEG_INF), axis=0)
            better = tile_best > best
            x0 = tl.where(better, v0 + tile_arg, x0)
            c_x0 = tl.where(better, tile_c, c_x0)
            best = tl.maximum(best, tile_best)

            # Online softmax statistics of the confidence logits.
            if remasking != _RANDOM:
                tile_m = tl.max(c, axis=0)
                m_new = tl.maximum(m, tile_m)
                m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)  # keeps -inf - -inf out
                alpha = tl.exp(m - m_ref)
                e = tl.exp(c - m_ref)
                if remasking == _ENTROPY:
                    # p log p -> 0 as p -> 0: a term whose e (or alpha) vanishes adds 0, also
                    # where its exponent c - m_ref (or m - m_ref) overflowed to -inf.
                    shift = tl.where(alpha > 0, m - m_ref, 0.0)
                    d = tl.where(e > 0, c - m_ref, 0.0)
                    t = alpha * (t + shift * s) + tl.sum(e * d, axis=0)
                if remasking == _MARGIN:
                    n_top = tl.sum((c == tile_m).to(tl.int32), axis=0)
                    tile_m2 = tl.where(n_top > 1, tile_m, tl.max(tl.where(c == tile_m, NEG_INF, c), axis=0))
                    m2 = tl.maximum(tl.minimum(m, tile_m), tl.maximum(m2, tile_m2))
                s = alpha * s + tl.sum(e, axis=0)
                m = m_new

        # x0 by the contract: NaN, then +inf, then the finite argmax, then first_allowed. A
        # non-finite x0 scores 0 (s is NaN, or x0's confidence logit is -inf).
        x0 = tl.where(first_code < hi, first_code,
                      tl.where(first_code < 2 * hi, first_code - hi,
                               tl.where(best > NEG_INF, x0, first_allowed)))
        c_x0 = tl.where(first_code < 2 * hi, NEG_INF, c_x0)
        # Score x0. Every formula is finite when the c_v are finite or -inf and some c_v is
        # finite (s >= 1); else it is NaN (a NaN or +inf c_v makes s NaN) and conf = 0.
        finite = m > NEG_INF
        m_ref = tl.where(finite, m, 0.0)
        s_ref = tl.where(finite, s, 1.0)
        p_x0 = tl.exp(c_x0 - m_ref) / s_ref
        margin = (1.0 - tl.exp(m2 - m_ref)) / s_ref
        neg_entropy = t / s_ref - precise_log(s_ref)
        conf = tl.where(remasking == _LOW_CONFIDENCE, p_x0,
                        tl.where(remasking == _MARGIN, margin, neg_entropy))
        conf = tl.where(finite & (conf == conf), conf, 0.0)
        if remasking == _RANDOM:
            conf = remask_uniform(seed, r)
        key = selection_key(conf + 0.0, l)  # + 0.0: -0 -> +0, equal confidences tie by position
        key = tl.where(candidate, key, tl.where((x0 != token) & (conf > edit_threshold), -2, -1))
        tl.store(x0_ptr + r, x0)
        if stats_mode != 0:
            y = tl.where(first_code < hi, float("nan"), tl.where(first_code < 2 * hi, INF, best))
            aux = tl.where(remasking == _LOW_CONFIDENCE, c_x0,
                           tl.where(remasking == _MARGIN, m2,
                                    tl.where(remasking == _ENTROPY, t, conf)))
            tl.store(stats_ptr + 4 * r, y)
            tl.store(stats_ptr + 4 * r + 1, m)
            tl.store(stats_ptr + 4 * r + 2, s)
            tl.store(stats_ptr + 4 * r + 3, aux)
    if stats_mode == 0:
        tl.store(key_ptr + r, key)


@triton.jit
def ordered_bits(f):
    """fp32 -> uint32, monotone: f < g  <=>  ordered(f) < ordered(g) (remask.h)."""
    u = f.to(tl.uint32, bitcast=True)
    return u ^ tl.where((u & 0x80000000) != 0, 0xFFFFFFFF, 0x80000000)  # flip all, or the sign


@triton.jit
def selection_key(conf, l):
    """(ordered(conf) << 31) | (2^31 - 1 - l): unique per row, lower l first on equal conf."""
    return (ordered_bits(conf).to(tl.int64) << 31) | (0x7FFFFFFF - l)


# --------------------------------------------------------------------------------------------
# Kernel 2: per row, commit the num_transfer[b] largest keys (and all above the threshold)
# --------------------------------------------------------------------------------------------

@triton.jit
def _select_kernel(
    key_ptr, x0_ptr,  # [B, L] int64, contiguous (kernel 1's outputs)
    x_ptr,  # [B, L] int64, strided
    num_transfer_ptr,  # [B] int64
    x_new_ptr, transfer_ptr,  # [B, L] int64 and bool outputs, contiguous
    L: tl.int64, stride_xb: tl.int64, stride_xl: tl.int64,
    threshold_key: tl.int64,  # ordered(threshold) << 31, or INT64_MAX without a threshold
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    keys = key_ptr + b * L
    k = tl.maximum(tl.load(num_transfer_ptr + b), 0)
    n_candidates = _count_at_least(keys, L, 0, BLOCK_L)

    # The k-th largest key: the largest tau with #(key >= tau) >= k. Keys of candidates are
    # in [0, 2^63), so tau is built bit by bit from bit 62 down.
    tau = tl.full((), 0, tl.int64)
    if (k > 0) & (k < n_candidates):
        for i in range(63):
            trial = tau | (tl.full((), 1, tl.int64) << (62 - i))
            tau = tl.where(_count_at_least(keys, L, trial, BLOCK_L) >= k, trial, tau)
    bound = tl.where(k >= n_candidates, -1, tl.where(k == 0, 9223372036854775807, tau))
    bound = tl.minimum(bound, threshold_key)

    for l0 in range(0, L, BLOCK_L):
        offs = l0 + tl.arange(0, BLOCK_L)
        in_row = offs < L
        key = tl.load(keys + offs, mask=in_row, other=-1)
        commit = ((key >= 0) & (key >= bound)) | (key == -2)  # -2: edited
        x0 = tl.load(x0_ptr + b * L + offs, mask=commit, other=0)
        x = tl.load(x_ptr + b * stride_xb + offs * stride_xl, mask=in_row, other=0)
        tl.store(x_new_ptr + b * L + offs, tl.where(commit, x0, x), mask=in_row)
        tl.store(transfer_ptr + b * L + offs, commit, mask=in_row)


@triton.jit
def _count_at_least(keys, L, tau, BLOCK_L: tl.constexpr):
    """#(keys[0:L] >= tau), int64."""
    n = tl.full((), 0, tl.int64)
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + tl.arange(0, BLOCK_L)
        key = tl.load(keys + offs, mask=offs < L, other=-1)
        n += tl.sum((key >= tau).to(tl.int32), axis=0)
    return n


# --------------------------------------------------------------------------------------------
# Every launch configuration above, for the ahead-of-time compile test (tests/test_triton_aot.py)
# --------------------------------------------------------------------------------------------

def _score_spec(dtype, has_cfg, sample):
    block_v, num_warps = SCORE_CONFIG
    i64 = "i64"
    signature = dict(
        logits_ptr=f"*{dtype}", uncond_ptr=f"*{dtype}", x_ptr="*i64", block_end_ptr="*i64",
        special_ids_ptr="*i64", seed_ptr="*i64", x0_ptr="*i64", key_ptr="*i64",
        stats_ptr="*fp32",
        L=i64, V=i64, stride_lb=i64, stride_ll=i64, stride_ub=i64, stride_ul=i64,
        stride_xb=i64, stride_xl=i64, editable_ptr="*u1", stride_eb=i64, stride_el=i64,
        edit_mode="i32", edit_threshold="fp32", mask_id=i64, cfg_weight="fp32", temperature="fp32",
        remasking="i32", n_special="i32", n_suppress="i32", first_allowed="i64",
        vocab_offset=i64, stats_mode="i32")
    aligned = tuple(p for p in signature if p.endswith("_ptr")) + (
        "V", "stride_lb", "stride_ll", "stride_ub", "stride_ul")  # V = 126464 = 16 * 7904
    name = f"remask_score_{dtype}{'_cfg' if has_cfg else ''}_{'sample' if sample else 'argmax'}"
    return AotSpec(name, _score_kernel, signature,
                   dict(HAS_CFG=has_cfg, SAMPLE=sample, BLOCK_V=block_v),
                   num_warps=num_warps, divisible_by_16=aligned)


AOT_SPECS = [_score_spec(dt, cfg, sample) for dt in DTYPES.values() for cfg in (False, True)
             for sample in (False, True)] + [
    AotSpec("remask_select", _select_kernel,
            dict(key_ptr="*i64", x0_ptr="*i64", x_ptr="*i64", num_transfer_ptr="*i64",
                 x_new_ptr="*i64", transfer_ptr="*u1", L="i64", stride_xb="i64",
                 stride_xl="i64", threshold_key="i64"),
            dict(BLOCK_L=SELECT_CONFIG[0]), num_warps=SELECT_CONFIG[1]),
]
