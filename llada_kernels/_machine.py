"""What the ops size their work from: this machine's caches.

Used by the fused linear loss (ops/loss.py) to choose its chunk of rows; the sizes come from
Linux's sysfs (the first CPU's caches), with a fallback for other systems.
"""

from __future__ import annotations

import functools
from pathlib import Path

FALLBACK_LAST_LEVEL = 32 << 20  # bytes: a server's L3 share, where sysfs says nothing
GEMM_ROWS = 128         # chunk rows that keep the chunk's GEMMs compute-bound (see below)
CACHED_GEMM_ROWS = 32   # ... when the weight stays in cache between chunks
MIN_ROWS = 32


def _size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@functools.cache
def last_level_cache() -> int:
    """Bytes of the largest data or unified cache of CPU 0 (its L3, or L2 where there is none)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() in ("Data", "Unified"):
                best = max(best, _size((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    return best or FALLBACK_LAST_LEVEL


def fused_loss_chunk_rows(M: int, D: int, V: int, itemsize: int, acc_itemsize: int) -> int:
    """Rows per chunk of fused_linear_masked_diffusion_loss: M masked rows, hidden size D,
    vocabulary V, the inputs' and the accumulation dtype's bytes per element.

    Per chunk of C rows, the loss reads the [V, D] weight twice (the logits, then d hidden) and
    d weight once (read and written): about 4 V D itemsize bytes for 6 C V D flops.
      * GEMM floor: where the weight is larger than half the last-level cache those bytes come
        from memory, and C >= GEMM_ROWS (128: 48 flops per byte of that traffic, above the
        flop/byte balance of today's x86 servers, 10 to 40) keeps the products compute-bound;
        where it fits, CACHED_GEMM_ROWS (32).
      * Cache target: the chunk's logits [C, V] in half the last-level cache: one GEMM writes
        them, the loss kernel rewrites them in place, two GEMMs read them.
      * Memory ceiling, with the temporaries counted: the fused form holds d weight [V, D] in
        the accumulation dtype from the first chunk on, and its backward holds it twice; a
        chunk's logits of at most that size (C <= D acc_itemsize / itemsize, and at least
        MIN_ROWS) never raise the peak above what d weight sets. (The per-chunk [C, D] products
        are smaller than the logits by V / D.)
    C = min(max(cache target, floor), ceiling), between 1 and M.
    """
    llc = last_level_cache()
    row = V * itemsize
    floor = CACHED_GEMM_ROWS if V * D * itemsize <= llc // 2 else GEMM_ROWS
    ceiling = max(MIN_ROWS, D * acc_itemsize // itemsize)
    rows = min(max(llc // 2 // max(row, 1), floor), ceiling)
    return max(1, min(M, rows))
