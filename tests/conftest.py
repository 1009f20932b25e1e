"""Test configuration.

Without a GPU, Triton kernels run on CPU tensors through the Triton interpreter, so the
interpreter is switched on before anything imports triton. On a GPU machine it stays off and
the same tests run the compiled kernels on CUDA tensors (tests/gpu/).
"""

import os

import pytest

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import llada_kernels  # noqa: E402,F401  (registers the ops)

CPU = torch.device("cpu")


# The kernel backends that must run on CPU tensors here. Not filtered by availability: a
# backend that fails to build or load fails its tests rather than skipping them.
KERNEL_BACKENDS = [pytest.param("cpu", id="cpu"),
                   pytest.param("triton", id="triton", marks=pytest.mark.triton)]
