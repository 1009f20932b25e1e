"""What the GPU tests share: the skip mark, and FlashAttention's accuracy rule.

Imported by tests/gpu/test_*_gpu.py; touches no CUDA at import (CI collects these files on a
machine without a GPU).
"""

import pytest
import torch

CUDA = torch.device("cuda")
# Where the tests put their tensors: CUDA. tests/test_gpu_runner.py sets it to the CPU to show,
# on a CPU kernel, that these checks catch a planted bug.
DEVICE = CUDA

# Every test in tests/gpu: marked `gpu`, skipped without a CUDA device.
GPU = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# Tests that hold many GB on the GPU: tests/gpu/run.sh runs tests in parallel (pytest-xdist,
# --dist loadgroup) and this group on one worker, one test at a time.
BIG_MEMORY = pytest.mark.xdist_group("big_memory")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_as_accurate(name, got, eager, truth, floor):
    """FlashAttention's rule: |got - truth| <= 2 |eager - truth| + floor, where eager is the
    reference computed in got's dtype and truth in fp64. The floor covers cases where eager
    happens to be exact; it is far below the O(1) errors of a wrong kernel."""
    err, eager_err = max_err(got, truth), max_err(eager, truth)
    bound = 2 * eager_err + floor
    assert err <= bound, f"{name}: error {err:.3g} > 2 x eager {eager_err:.3g} + {floor}"
