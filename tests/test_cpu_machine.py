"""The fused linear loss's chunk of rows, sized from the machine (llada_kernels/_machine.py)."""

import pytest

from llada_kernels import _machine


def test_last_level_cache_is_read():
    assert _machine.last_level_cache() >= 256 << 10


@pytest.mark.parametrize("llc", [1 << 20, 32 << 20, 1 << 30])
@pytest.mark.parametrize("D, V, itemsize", [(64, 126464, 4), (256, 126464, 4), (512, 32000, 4),
                                            (4096, 126464, 2), (16, 1000, 4)])
def test_chunk_rows(monkeypatch, llc, D, V, itemsize):
    monkeypatch.setattr(_machine, "last_level_cache", lambda: llc)
    rows = _machine.fused_loss_chunk_rows(10**6, D, V, itemsize, 4)
    # Never more logits than the d weight gradient the fused form holds anyway ...
    assert rows * V * itemsize <= max(_machine.MIN_ROWS * V * itemsize, V * D * 4)
    # ... and, where the weight does not stay in cache, enough rows for the GEMMs (when allowed).
    if V * D * itemsize > llc // 2:
        assert rows >= min(_machine.GEMM_ROWS, max(_machine.MIN_ROWS, D * 4 // itemsize))
    assert _machine.fused_loss_chunk_rows(5, D, V, itemsize, 4) == 5  # at most the masked rows
    assert _machine.fused_loss_chunk_rows(0, D, V, itemsize, 4) == 1


def test_size_parsing():
    assert _machine._size("32768K") == 32 << 20 and _machine._size("2M") == 2 << 20
