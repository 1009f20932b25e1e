"""remask_step on CUDA tensors: the Triton and CUDA C++ kernels against the reference (which
runs on the same GPU), the shared noise contract across devices, and 64-bit offsets.
Skipped without a GPU; run with tests/gpu/run.sh where one is present."""

import pytest
import torch

from llada_kernels import remask_step
from test_remask_step import (MASK, MODES, SHAPES, chi2, CHI2_CRIT, make_inputs, rows,
                              tie_free)

from gpu_common import BIG_MEMORY, GPU

pytestmark = GPU
GPU_BACKENDS = ["triton", "cuda"]
CUDA = torch.device("cuda")


def check(backend, logits, x, k, **kw):
    kw = {key: (v.to(CUDA) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    logits, x, k = logits.to(CUDA), x.to(CUDA), k.to(CUDA) if isinstance(k, torch.Tensor) else k
    want = remask_step(logits, x, k, backend="reference", **kw)
    got = remask_step(logits, x, k, backend=backend, **kw)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES + [(4, 300, 126464)], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, mode, shape):
    B, L, V = shape
    k = torch.arange(B, dtype=torch.int64) * 2 + 1
    mask_id = MASK if V > MASK else 0
    logits, x, _ = tie_free(B, L, V, k, rows(L, B), mode, dtype=dtype, mask_id=mask_id)
    check(backend, logits, x, k, mask_id=mask_id, remasking=mode)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_edge_cases(backend):
    B, L, V = 3, 40, 1000
    logits, x, cfg = tie_free(B, L, V, torch.tensor([2, 0, 50]), torch.tensor([0, 17, 99]),
                              "low_confidence", cfg_scale=1.5, suppress_ids=(3,), zero_ids=(5,),
                              threshold=0.01)
    check(backend, logits, x, torch.tensor([2, 0, 50]), mask_id=MASK, threshold=0.01,
          block_end=torch.tensor([0, 17, 99]), suppress_ids=[3], zero_confidence_ids=[5], **cfg)
    strided = torch.cat([logits, logits], 1)[:, ::2]
    check(backend, strided, x, torch.tensor([2, 0, 50]), mask_id=MASK)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sampling_frequencies(backend):
    V, N, T = 8, 20000, 0.7
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0])
    g = torch.Generator(device=CUDA).manual_seed(3)
    x_new, _ = remask_step(row.expand(1, N, V).contiguous().to(CUDA), torch.full((1, N), MASK, device=CUDA),
                           N, mask_id=MASK, temperature=T, generator=g, backend=backend)
    counts = torch.bincount(x_new[0].cpu(), minlength=V).double()
    assert chi2(counts, torch.softmax(row.double() / T, 0)) < CHI2_CRIT[7]


def test_every_device_draws_the_same_noise():
    """The noise contract: one seed, the same tokens from C++ CPU, Triton and CUDA kernels."""
    logits, x = make_inputs(2, 33, 3000, masked=1.0, seed=8)
    args = lambda dev: (logits.to(dev), None, 0.0, x.to(dev), torch.full((2,), 33, device=dev),  # noqa: E731
                        torch.full((2,), 33, device=dev), MASK, 1.0, "low_confidence", None, [],
                        [], torch.tensor([1234567], device=dev))
    cpu = torch.ops.llada.remask_step(*args("cpu"))[0]
    assert torch.equal(torch.ops.llada.remask_step(*args(CUDA))[0].cpu(), cpu)
    assert torch.equal(torch.ops.llada.remask_step_triton(*args(CUDA))[0].cpu(), cpu)


@BIG_MEMORY
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_offsets_beyond_int32(backend):
    V = 716_000_000  # 3 rows x V > 2^31 elements, 4.3 GB of bf16
    logits = torch.zeros(1, 3, V, dtype=torch.bfloat16, device=CUDA)
    logits[0, 2, V - 3] = 5.0
    x = torch.tensor([[1, 1, 0]], device=CUDA)
    x_new, _ = remask_step(logits, x, 1, mask_id=0, backend=backend)
    assert x_new.tolist() == [[1, 1, V - 3]]


@pytest.mark.parametrize("name", ["remask_step", "remask_step_triton"])
def test_opcheck_cuda(name):
    logits, x = make_inputs(2, 6, 20, seed=1)
    args = (logits.to(CUDA), None, 0.0, x.to(CUDA), torch.tensor([2, 1], device=CUDA),
            torch.full((2,), 6, device=CUDA), MASK, 0.5, "low_confidence", None, [3], [4],
            torch.tensor([42], device=CUDA))
    torch.library.opcheck(getattr(torch.ops.llada, name), args)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", ["odd 3x7 V=37", "bf16 V=4099", "fp16 cfg",
                                  "suppress+zero_confidence", "editable=None"])
def test_token_editing_matches_reference(backend, case):
    """LLaDA2.1's token editing (edit_threshold, editable) on CUDA tensors: tests/
    test_remask_edit.py's cases (clear of the threshold and tie-free), exact against the
    reference on the same GPU."""
    from test_remask_edit import EDIT_CASES, edit_case

    B, L, V, opts = EDIT_CASES[case]
    k = torch.tensor([2, 0, 5])[:B]
    logits, x, kw = edit_case(B, L, V, k, **opts)
    check(backend, logits, x, k, **kw)
    want = remask_step(logits, x, k, backend="reference", **kw)[1]
    assert (want & (x != MASK)).any(), "the case must edit something"
