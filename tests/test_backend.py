"""llada_kernels.available_backends: public op names, and no backend for a device this process
cannot use (issue 12 item 5)."""

import pytest
import torch

import llada_kernels as lk
from llada_kernels import _backend

PUBLIC = ["remask_step", "masked_diffusion_loss", "fused_linear_masked_diffusion_loss",
          "attention", "bidirectional_attention"]

needs_c = pytest.mark.skipif(_backend._C_ERROR is not None, reason="llada_kernels._C not built")


@needs_c
@pytest.mark.parametrize("op", PUBLIC)
def test_public_names_list_the_cpu_backends(op):
    got = lk.available_backends(op, "cpu")
    assert got[:2] == ["reference", "cpu"]
    assert ("triton" in got) == (_backend._triton_error() is None and _backend.interpreting())


@needs_c
def test_public_name_equals_its_kernel_name():
    for device in ("cpu", "cuda"):
        assert lk.available_backends("attention", device) == \
            lk.available_backends("attention_fwd", device)
        # the deprecated name of the same op
        assert lk.available_backends("bidirectional_attention", device) == \
            lk.available_backends("attention", device)


@needs_c
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("op", PUBLIC)
def test_no_gpu_no_cuda_backends(op):
    """TRITON_INTERPRET=1 (set by conftest) makes Triton run CPU tensors, not CUDA ones."""
    assert _backend.interpreting()
    assert lk.available_backends(op, "cuda") == []
    assert lk.available_backends(op, torch.device("cuda", 0)) == []


@needs_c
def test_unknown_op_is_named():
    with pytest.raises(ValueError, match=r"'attn' is not an op of llada_kernels; expected one of "
                                         r"attention, .*remask_step"):
        lk.available_backends("attn", "cpu")
    with pytest.raises(TypeError, match="op must be a str"):
        lk.available_backends(None, "cpu")
