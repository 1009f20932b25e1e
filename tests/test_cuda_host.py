"""The CUDA C++ kernels, run on CPU tensors through the host emulation (csrc/emu), against the
references: every kernel and entry point, forward and backward, every dtype and head dimension
the CUDA backend supports, with the same checks and tolerances as the other backends' tests
(tests/test_remask_step.py, test_masked_diffusion_loss.py, test_attention_masks.py).

Inside `EmulatedCuda()` the public ops with backend="cpu" run the CUDA kernels instead of the C++
CPU kernels (tests/cuda_emu.py): each kernel call runs twice, in two thread orders, with the
shared-memory hazard checker on, and must give the same bits both times. Each test also checks
that the emulated kernels did run.
"""

import pytest
import torch

from llada_kernels import masks

import test_attention_lse as lse_test
import test_attention_masks as am
import test_bidirectional_attention as attn
import test_masked_diffusion_loss as loss
import test_remask_edit as edit
import test_remask_noise as noise
import test_remask_step as remask
from cuda_emu import EmulatedCuda, emu_lib, run  # noqa: F401  (emu_lib: the session's build)

pytestmark = pytest.mark.usefixtures("emu_lib")


# ---- remask_step --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", remask.MODES)
def test_remask_step_modes_and_dtypes(mode, dtype):
    B, L, V = 3, 17, 1000
    k = torch.tensor([1, 3, 5])
    logits, x, _ = remask.tie_free(B, L, V, k, remask.rows(L, B), mode, dtype=dtype)
    with EmulatedCuda() as emu:
        remask.check_against_reference("cpu", logits, x, k, mask_id=remask.MASK, remasking=mode)
    assert emu.calls["remask_step"] == 1


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 37), (2, 9, 2), (2, 5, 4099)],
                         ids=lambda s: "x".join(map(str, s)))
def test_remask_step_shapes(shape):
    """Vocabularies below one 16-byte vector, not a multiple of one, and a row of 4099."""
    B, L, V = shape
    k = torch.arange(B, dtype=torch.int64) * 2 + 1
    mask_id = remask.MASK if V > remask.MASK else 0
    logits, x, _ = remask.tie_free(B, L, V, k, remask.rows(L, B), "low_confidence",
                                   dtype=torch.bfloat16, mask_id=mask_id)
    with EmulatedCuda() as emu:
        remask.check_against_reference("cpu", logits, x, k, mask_id=mask_id)
    assert emu.calls["remask_step"] == 1


@pytest.mark.parametrize("case", ["k=0", "k>candidates", "all masked", "none masked",
                                  "block_end int", "block_end rows", "threshold", "cfg",
                                  "suppress+zero_confidence", "strided", "llada ids"])
def test_remask_step_edge_cases(case):
    """tests/test_remask_step.py's edge cases (threshold, CFG, special ids, strided and
    misaligned rows, LLaDA's vocabulary...), on the CUDA kernels."""
    with EmulatedCuda() as emu:
        remask.test_backend_edge_cases("cpu", case)
    assert emu.calls["remask_step"] >= 1


def test_remask_step_long_rows_and_no_finite_confidence():
    with EmulatedCuda() as emu:
        remask.test_rows_longer_than_one_selection_tile("cpu")
        remask.test_k_larger_than_candidates_commits_every_candidate_and_nothing_else("cpu")
        remask.test_rows_without_finite_confidence_logits_score_zero("cpu")
    assert emu.calls["remask_step"] == 3


def _op_args(logits, x, k, *, temperature, mode, seed, uncond=None, cfg_scale=0.0, threshold=None,
             suppress=(), zero=()):
    B, L, _ = logits.shape
    return (logits, uncond, cfg_scale, x, k, torch.full((B,), L), remask.MASK, temperature, mode,
            threshold, list(suppress), list(zero), torch.tensor([seed]))


@pytest.mark.parametrize("mode, temperature", [("low_confidence", 0.7), ("low_confidence", 3.0),
                                               ("random", 0.0), ("random", 0.7), ("entropy", 0.7),
                                               ("margin", 0.0)])
def test_remask_step_draws_match_the_cpu_kernel(mode, temperature):
    """One seed, the same tokens from the CUDA kernel as from the C++ CPU kernel: the Gumbel
    noise at T > 0 and the uniforms of random remasking (common/random.h), with classifier-free
    guidance, a threshold and special ids in the same pass."""
    logits, x = remask.make_inputs(2, 33, 300, masked=0.8, seed=8)
    uncond = remask.make_inputs(2, 33, 300, seed=9)[0]
    args = _op_args(logits, x, torch.tensor([3, 40]), temperature=temperature, mode=mode,
                    seed=1234567, uncond=uncond, cfg_scale=0.5, threshold=0.5, suppress=(3,),
                    zero=(5, 6))
    want = torch.ops.llada.remask_step(*args)
    got = run("remask_step", args)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_remask_step_sampling_is_exact(dtype):
    """At T > 0, x0 is exactly the argmax of the CUDA kernel's noisy logits l + T g, each
    operation rounded to fp32 (it does not contract them to an fma), over the contract's noise
    drawn independently in numpy: the kernel's pruning (ids whose noisy logit is bounded below
    the best draw no noise) is exact."""
    B, L, V = 1, 16, 301
    logits = remask.make_inputs(B, L, V, dtype=dtype)[0].float()
    x = torch.full((B, L), remask.MASK)
    bits = noise._philox_bits(1234, B * L, V)
    g = torch.ops.llada.gumbel_from_bits(bits.flatten()).view(B * L, V)
    for T in (0.05, 1.0, 30.0):
        x0 = run("remask_step", _op_args(logits, x, torch.tensor([L]), temperature=T,
                                         mode="low_confidence", seed=1234))[0]
        noisy = logits.reshape(B * L, V) + (torch.tensor(T, dtype=torch.float32) * g)
        assert torch.equal(x0.flatten(), noisy.argmax(-1))


@pytest.mark.parametrize("case", list(edit.EDIT_CASES))
def test_remask_step_editing(case):
    """Token editing (tests/test_remask_edit.py's cases: odd shapes, every dtype, CFG, special
    ids, editable=None) against the reference."""
    with EmulatedCuda() as emu:
        edit.test_backend_edits_as_the_reference("cpu", case)
    assert emu.calls["remask_step"] >= 1


def test_remask_step_editing_rules():
    """Editing past block_end with strided inputs, the strict threshold at exact boundaries,
    masked and unchanged positions never edited, and at T > 0 each position's own noise."""
    with EmulatedCuda() as emu:
        edit.test_threshold_block_end_and_strided_inputs("cpu")
        edit.test_the_edit_threshold_is_strict("cpu")
        edit.test_masked_positions_and_unchanged_tokens_are_never_edited("cpu")
        edit.test_sampling_edits_with_the_positions_own_noise("cpu", 0.6)
    assert emu.calls["remask_step"] >= 10


def test_remask_step_editing_draws_match_the_cpu_kernel():
    """One seed, CFG, a threshold, special ids and editing at T > 0: the CUDA kernel edits the
    positions the C++ CPU kernel edits, with the same tokens."""
    logits, x = remask.make_inputs(2, 33, 300, masked=0.3, seed=8, scale=1.0)
    uncond = remask.make_inputs(2, 33, 300, seed=9, scale=1.0)[0]
    editable = torch.rand(2, 33, generator=torch.Generator().manual_seed(2)) < 0.6
    args = _op_args(logits, x, torch.tensor([3, 40]), temperature=0.7, mode="low_confidence",
                    seed=1234567, uncond=uncond, cfg_scale=0.5, threshold=0.5, suppress=(3,),
                    zero=(5, 6))
    for kw in (dict(edit_threshold=0.02, editable=editable), dict(edit_threshold=0.02)):
        want = torch.ops.llada.remask_step(*args, **kw)
        got = run("remask_step", args, kw)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert (want[1] & (x != remask.MASK)).any()


def test_remask_step_editing_refused_with_another_mode():
    logits, x = remask.make_inputs(2, 6, 20, seed=1)
    args = _op_args(logits, x, torch.tensor([2, 1]), temperature=0.0, mode="margin", seed=1)
    with pytest.raises(RuntimeError, match="edit_threshold needs remasking='low_confidence'"):
        run("remask_step", args, dict(edit_threshold=0.2))


def test_gumbel_from_bits_matches_the_cpu_kernel():
    extremes = [0, 1, 2047, 2048, 4096, 2**63 - 1, -(2**63), -1, 0x5555555555555555, -2048]
    bits = torch.cat([torch.tensor(extremes), torch.randint(-(2**63), 2**63 - 1, (3000,),
                                                            generator=torch.Generator().manual_seed(0))])
    got = run("gumbel_from_bits", (bits,))
    assert torch.equal(got, torch.ops.llada.gumbel_from_bits(bits))
    assert run("gumbel_from_bits", (bits[:0],)).shape == (0,)


# ---- masked_diffusion_loss: the three row kernels and the fused-linear form --------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 7, 77), (1, 1, 5), (1, 5, 1), (2, 3, 1100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_loss_rows(shape, dtype):
    """The forward and backward row kernels (V below, around and above a block of 512 threads)."""
    with EmulatedCuda() as emu:
        loss.check_backend("cpu", *loss.make_inputs(*shape, dtype=dtype))
    assert emu.calls["masked_diffusion_loss"] == 1 and emu.calls["masked_diffusion_loss_backward"] == 1


def test_loss_rows_float64():
    """fp64 logits (the kernels accumulate in fp64): the eager fp64 reference is the truth here,
    so the "2 x eager's error" rule would allow nothing; a summation order of its own costs the
    kernel a few ulps. And gradcheck, as the CPU kernel's test does."""
    logits, targets, masked, p_mask = loss.make_inputs(2, 3, 1100, dtype=torch.float64)
    with EmulatedCuda() as emu:
        got = loss.loss_and_grad(loss.masked_diffusion_loss, logits, targets, masked, p_mask, backend="cpu")
        small = loss.make_inputs(1, 2, 5, dtype=torch.float64, masked=1.0)
        x = small[0].requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x: loss.masked_diffusion_loss(x, *small[1:], backend="cpu", reduction="none"), (x,))
    want = loss.loss_and_grad(loss.ref.masked_diffusion_loss, logits, targets, masked, p_mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-13, atol=1e-13)
    assert emu.calls["masked_diffusion_loss"] > 1 and emu.calls["masked_diffusion_loss_backward"] > 1


def test_loss_rows_edge_cases():
    with EmulatedCuda() as emu:
        for masked in (0.0, 1.0):
            loss.test_mask_extremes("cpu", masked, "BL")
        loss.test_bf16_large_magnitudes("cpu")
        loss.test_neg_inf_on_non_targets("cpu", torch.bfloat16)
        loss.test_reduction_none_and_strided_logits("cpu")
    assert emu.calls["masked_diffusion_loss"] == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_size", [1, None])
def test_loss_fused_linear(dtype, chunk_size):
    """The fused-linear composite on the in-place forward-backward kernel, chunk by chunk."""
    with EmulatedCuda() as emu:
        loss.test_fused_form("cpu", dtype, chunk_size, bias=True)
    assert emu.calls["masked_diffusion_loss_fwd_bwd"] >= 1


def test_loss_fused_linear_no_grad_and_mask_extremes():
    with EmulatedCuda() as emu:
        loss.test_fused_no_grad_keeps_nothing()
        for masked in (0.0, 1.0):
            loss.test_fused_mask_extremes("cpu", masked)
    assert emu.calls["masked_diffusion_loss"] >= 1 and emu.calls["masked_diffusion_loss_fwd_bwd"] >= 1


def test_loss_out_of_range_target_is_nan_not_a_read():
    logits = torch.randn(3, 40)
    targets = torch.tensor([-1, 40, 5])
    weights = torch.ones(3)
    ce, stats = run("masked_diffusion_loss", (logits, targets, weights))
    assert ce[:2].isnan().all() and ce[2].isfinite()
    torch.testing.assert_close(stats.sum(-1), torch.logsumexp(logits, -1))  # max + log-sum


# ---- attention ----------------------------------------------------------------------------------

# The CUDA kernels are llada::attention_fwd/bwd. The public op runs the cpu backend on
# llada::attention_fwd only where its C++ CPU kernel is built, so these tests call the op
# directly (am.direct_op) against fp64 SDPA with the dense mask (FlashAttention's 2x rule).

# (B, Hq, Hkv, Lq, Lk, D, key padding, layout, dtype): both dtypes with both head dims, GQA
# 1/2/4, odd and unequal lengths, single rows, key tiles that are all padding (skipped), rows
# with no key, strided and misaligned inputs.
ATTN_CASES = [
    (2, 4, 2, 65, 70, 64, "some", "contiguous", torch.bfloat16),
    (1, 4, 1, 33, 130, 64, "half_pad", "contiguous", torch.float16),
    (2, 2, 2, 7, 129, 128, "empty_row", "contiguous", torch.bfloat16),
    (1, 2, 1, 129, 7, 128, "left_pad", "bshd", torch.float16),
    (2, 2, 2, 1, 1, 64, "none", "offset", torch.bfloat16),
    (1, 2, 2, 64, 64, 128, "full", "strided_d", torch.float16),
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "-".join(map(str, c[:8])) + f"-{c[8]}".replace("torch.", ""))
def test_attention(case):
    *shape, kind, layout, dtype = case
    kpm = attn.make_mask(kind, shape[0], shape[4], torch.Generator().manual_seed(0))
    mask = None if kpm is None else masks.key_padding(kpm, shape[3])
    with EmulatedCuda() as emu:
        am.check_backend("cuda", "cpu", tuple(shape), "none", dtype, layout=layout, mask=mask,
                         fn=am.direct_op())
    assert emu.calls["attention_fwd"] == 1 and emu.calls["attention_bwd"] == 1


# The structured masks (tests/test_attention_masks.py's cases, at the CUDA kernels' head dims):
# block-causal with b = 1, 4, 32, 37, KV-cache offsets per row, documents (cu_seqlens, unsorted
# ids, with blocks), the 2L block-diffusion mask, rows that see no key.
# Both dtypes, alternately (each emulated case costs seconds).
MASK_CASES = [(*c[:5], 128 if c[5] == 32 else 64, c[6], (torch.bfloat16, torch.float16)[i % 2])
              for i, c in enumerate(c for c in am.KERNEL_CASES if c[6] != "key_padding")]


@pytest.mark.parametrize("case", MASK_CASES,
                         ids=lambda c: f"{c[6]}-{'x'.join(map(str, c[:6]))}-{str(c[7])[6:]}")
def test_attention_masks(case):
    *shape, kind, dtype = case
    with EmulatedCuda() as emu:
        am.check_backend("cuda", "cpu", tuple(shape), kind, dtype, fn=am.direct_op())
    assert emu.calls["attention_fwd"] == 1 and emu.calls["attention_bwd"] == 1


@pytest.mark.parametrize("case,dtype", [((2, 2, 1, 70, 70, 64, "block_diffusion"), torch.bfloat16),
                                        ((2, 2, 1, 70, 70, 128, "empty_rows"), torch.float16)],
                         ids=["block_diffusion-bf16", "empty_rows-fp16"])
def test_attention_lse_gradient(case, dtype):
    """return_lse's gradient through the CUDA backward (delta less dlse in the delta kernel):
    tests/test_attention_lse.py's check, fp64 truth, 2x rule."""
    *shape, kind = case

    def fn(q, k, v, mask):
        out, lse = torch.ops.llada.attention_fwd(q, k, v, *mask.tensors(q.shape[0]),
                                                 q.shape[-1] ** -0.5)
        return out, lse.masked_fill(lse == float("inf"), float("-inf"))

    with EmulatedCuda() as emu:
        lse_test.check_lse(fn, tuple(shape), kind, dtype)
    assert emu.calls["attention_fwd"] >= 1 and emu.calls["attention_bwd"] >= 1


def test_attention_rejects_what_the_cuda_kernel_does_not_support():
    q = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="D must be 64 or 128"):
        run("attention_fwd", (q, q, q, None, None, 1.0))
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        run("attention_fwd", (q.float(), q.float(), q.float(), None, None, 1.0))
    # Past 65535 tiles of 64 rows along grid.y: a named error, not a failed launch (stride-0
    # views: nothing of that size is allocated).
    long = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16).expand(1, 1, 65535 * 64 + 1, 64)
    short = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="Lq and Lk must be <= 4194240.*Lq = 4194241, Lk = 8"):
        run("attention_fwd", (long, short, short, None, None, 1.0))
    with pytest.raises(RuntimeError, match="Lq = 8, Lk = 4194241"):
        run("attention_fwd", (short, long, long, None, None, 1.0))
