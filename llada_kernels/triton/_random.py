"""The Triton side of the random-number contract in csrc/common/random.h.

The C++ CPU, CUDA and Triton kernels draw the same bits for the same seed, so they sample the
same tokens; only the last ulp of a log may differ. In short (random.h has the full text):

    Philox4x32-10, key = the 64-bit seed (tl.random.philox: the same rounds and key schedule).
    Gumbel noise of vocabulary id v at position r = b * L + l:
        counter (v >> 1, r_lo, r_hi, 0) -> words (w0, w1, w2, w3);
        id 2j takes the 64-bit draw w0:w1, id 2j + 1 takes w2:w3 (one Philox call, two ids).
        n = bits >> 11 (53 bits),  u = (n + 1/2) 2^-53,  g = -log(E) with E = -log u:
            u <  1/2:  E = -log(u)
            u >= 1/2:  E = -log1p(-w), w = 1 - u = (2^53 - 1 - n + 1/2) 2^-53, exact
        so g reaches about 37.4, the tail of float64 uniforms, not the 16.6 of 1 - u in fp32.
    Uniform of position r for "random" remasking:
        counter (0, r_lo, r_hi, 1) -> u = (w0 >> 8) 2^-24, the 24 bits of a float32 torch.rand.

Logs are libdevice's logf/log1pf, the accurate ones (never the approximate lg2). The Triton
interpreter cannot call libdevice; there tl.log is numpy's float32 log, which is accurate,
and log1p is derived from it (see precise_log1p).

gumbel_noise() and gumbel_from_bits() expose the device functions to tests.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._backend import interpreting

_LIBDEVICE: tl.constexpr = tl.constexpr(not interpreting())
_TWO_POW_M53: tl.constexpr = tl.constexpr(1.1102230246251565e-16)  # 2^-53, exact in fp32
_TWO_POW_M24: tl.constexpr = tl.constexpr(5.9604644775390625e-08)  # 2^-24


@triton.jit
def precise_log(x):
    """Natural log of fp32 x, accurate to an ulp (libdevice logf)."""
    if _LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def precise_log1p(x):
    """log(1 + x) of fp32 x, accurate for tiny x (libdevice log1pf)."""
    if _LIBDEVICE:
        return libdevice.log1p(x)
    else:
        # Interpreter: log1p(x) = log(u) * x / (u - 1) with u = fl(1 + x) (Goldberg, 1991):
        # the rounding error of u cancels between log(u) and u - 1; x itself where u == 1.
        u = 1.0 + x
        same = u == 1.0
        return tl.where(same, x, precise_log(u) * (x / tl.where(same, 1.0, u - 1.0)))


@triton.jit
def _philox(seed, c0, r, c3: tl.constexpr):
    """Philox4x32-10 of counter (c0, r_lo, r_hi, c3); c0 a block of uint32, r an int64 scalar."""
    zero = c0 * 0
    r_lo = zero + (r & 0xFFFFFFFF).to(tl.uint32)
    r_hi = zero + (r >> 32).to(tl.uint32)
    return tl.random.philox(seed, c0, r_lo, r_hi, zero + c3)


@triton.jit
def gumbel_from_bits(bits):
    """Standard Gumbel noise (fp32) from 64-bit draws (uint64), per random.h."""
    n = bits >> 11
    low = n < (1 << 52)  # u < 1/2
    # a = min(u, 1 - u) = (m + 1/2) 2^-53, with m = n below 1/2 and 2^53 - 1 - n above.
    m = tl.where(low, n, ((1 << 53) - 1) - n)
    a = (m.to(tl.float32) + 0.5) * _TWO_POW_M53
    e = tl.where(low, -precise_log(a), -precise_log1p(-a))  # E = -log u
    return -precise_log(e)


@triton.jit
def gumbel_tile(seed, r, v0, BLOCK_V: tl.constexpr):
    """Gumbel noise [BLOCK_V] fp32 of ids v0 .. v0 + BLOCK_V - 1 at position r (v0 even)."""
    j = (v0 // 2 + tl.arange(0, BLOCK_V // 2)).to(tl.uint32)  # one Philox call per id pair
    w0, w1, w2, w3 = _philox(seed, j, r, 0)
    even = (w0.to(tl.uint64) << 32) | w1.to(tl.uint64)  # id 2j
    odd = (w2.to(tl.uint64) << 32) | w3.to(tl.uint64)  # id 2j + 1
    return tl.interleave(gumbel_from_bits(even), gumbel_from_bits(odd))


@triton.jit
def remask_uniform(seed, r):
    """u ~ U[0, 1) (fp32 scalar, 24 bits) for "random" remasking of position r."""
    w0, _, _, _ = _philox(seed, (r * 0).to(tl.uint32), r, 1)
    return (w0 >> 8).to(tl.float32) * _TWO_POW_M24


# --------------------------------------------------------------------------------------------
# Test hooks: the device functions above on whole tensors (CUDA, or CPU under the interpreter)
# --------------------------------------------------------------------------------------------

@triton.jit
def _gumbel_noise_kernel(seed_ptr, out_ptr, u_ptr, V, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr)
    for v0 in range(0, V, BLOCK_V):
        ids = v0 + tl.arange(0, BLOCK_V)
        tl.store(out_ptr + r * V + ids, gumbel_tile(seed, r, v0, BLOCK_V), mask=ids < V)
    tl.store(u_ptr + r, remask_uniform(seed, r))


@triton.jit
def _gumbel_from_bits_kernel(bits_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bits = tl.load(bits_ptr + offs, mask=offs < N).to(tl.uint64, bitcast=True)
    tl.store(out_ptr + offs, gumbel_from_bits(bits), mask=offs < N)


def gumbel_noise(seed: torch.Tensor, positions: int, V: int, block_v: int = 16):
    """Gumbel noise [positions, V] fp32 of positions r = 0 .. positions - 1, and the "random"
    remasking uniforms [positions] fp32, for the seed in `seed` ([1] int64)."""
    out = torch.empty((positions, V), dtype=torch.float32, device=seed.device)
    u = torch.empty(positions, dtype=torch.float32, device=seed.device)
    _gumbel_noise_kernel[(positions,)](seed, out, u, V, BLOCK_V=block_v)
    return out, u


def gumbel_from_bits_tensor(bits: torch.Tensor) -> torch.Tensor:
    """Gumbel noise fp32 from raw 64-bit draws (any shape, int64), as the kernels compute it."""
    flat = bits.reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.float32, device=bits.device)
    BLOCK = 256
    _gumbel_from_bits_kernel[(triton.cdiv(flat.numel(), BLOCK),)](flat, out, flat.numel(), BLOCK=BLOCK)
    return out.view(bits.shape)
