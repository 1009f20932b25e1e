"""The host emulation of CUDA itself (csrc/emu): its parts against independent answers, and its
checkers against deliberately broken kernels, small ones of its own (csrc/emu/selftest.cu) and
bugs planted at run time into the real kernels of csrc/cuda.

A checker that cannot fail proves nothing: every check here has a kernel that must trip it.
"""

import re
from pathlib import Path

import pytest
import torch

import test_attention_masks as am
import test_masked_diffusion_loss as loss
import test_remask_step as remask
from cuda_emu import EmulatedCuda, emu_lib, plant, set_schedule, stats  # noqa: F401  (emu_lib: a fixture)

pytestmark = pytest.mark.usefixtures("emu_lib")
ROOT = Path(__file__).resolve().parents[1]
T = None  # torch.ops.llada_emu_test, once the library is loaded
ORDERS = [("forward", 0.0), ("reverse", 0.0), ("random", 0.2)]


@pytest.fixture(autouse=True)
def clean_state(emu_lib):
    global T
    T = torch.ops.llada_emu_test
    yield
    plant()
    set_schedule()


def under(order, preempt, fn, *args, hazards=True, seed=1):
    set_schedule(order, seed, preempt, hazards)
    try:
        return fn(*args)
    finally:
        set_schedule()


# ---- a removed __syncthreads ----------------------------------------------------------------------

@pytest.mark.parametrize("order, preempt", ORDERS)
def test_reverse_through_shared_memory(order, preempt):
    x = torch.randn(3, 64)
    assert torch.equal(under(order, preempt, T.reverse, x, True), x.flip(1))


@pytest.mark.parametrize("order, preempt", ORDERS)
def test_removed_syncthreads_is_reported_in_every_order(order, preempt):
    with pytest.raises(RuntimeError, match=r"shared-memory hazard \((uninitialised read|read after write)\)"):
        under(order, preempt, T.reverse, torch.randn(3, 64), False)


def test_removed_syncthreads_changes_the_result_between_orders():
    """With the checker off, the two thread orders alone expose the missing barrier."""
    x = torch.randn(3, 64)
    fwd = under("forward", 0.0, T.reverse, x, False, hazards=False)
    rev = under("reverse", 0.0, T.reverse, x, False, hazards=False)
    assert not torch.equal(fwd, rev)
    assert not torch.equal(fwd, x.flip(1)) and not torch.equal(rev, x.flip(1))


# ---- the hazard checker and the scheduler's other checks, one planted kernel each -------------

PLANTED = {  # kind: (what the kernel does, the error it must raise or None)
    0: ("own slot, barrier, neighbour's slot", None),
    1: ("two threads write one slot", r"hazard \(write after write\)"),
    2: ("a read of a slot nobody wrote", r"hazard \(uninitialised read\)"),
    3: ("a read and a write by two threads", r"hazard \((write after read|read after write)\)"),
    4: ("atomics, a barrier, a read", None),
    5: ("a plain read among atomics", r"hazard \((read after write|atomic after a plain read)\)"),
    6: ("__syncwarp orders a write and a read", None),
    7: ("the same without __syncwarp", r"hazard \((read after write|write after read|uninitialised read)\)"),
    8: ("threads at two barriers", r"divergent barriers"),
    9: ("a barrier against a shuffle", r"deadlock"),
    10: ("a shuffle from an exited lane", r"reads lane 31, which does not take part"),
    11: ("past the dynamic shared memory", r"out-of-bounds shared-memory access"),
    12: ("__trap()", r"__trap\(\)"),
    14: ("two blocks store to one global word", r"global-memory race \(write after write\).*not ordered"),
    15: ("a global load after another thread's store", r"global-memory race \(read after write|write after read\)"),
    16: ("the same with a barrier", None),
    17: ("global atomics from two blocks", None),
    18: ("a plain load among other blocks' atomics", r"global-memory race \((read after atomics|atomic)"),
}


@pytest.mark.parametrize("order, preempt", ORDERS)
@pytest.mark.parametrize("kind", list(PLANTED), ids=lambda k: PLANTED[k][0].replace(" ", "_"))
def test_planted_kernel(kind, order, preempt):
    _, error = PLANTED[kind]
    blocks = 2 if kind >= 14 else 1
    if error is None:
        out = under(order, preempt, T.planted, kind, blocks, 64, 256)
        want = {0: torch.arange(1, 65) % 64, 4: torch.full((64,), 64),
                6: torch.tensor([42] * 32 + [0] * 32), 16: torch.tensor([0, 5, 5] + [0] * 61),
                17: torch.tensor([128] + [0] * 63)}[kind]
        assert torch.equal(out, want.int())
    else:
        with pytest.raises(RuntimeError, match=error):
            under(order, preempt, T.planted, kind, blocks, 64, 256)


def test_the_orders_differ():
    """Tickets from a shared atomic counter record the order the threads ran in."""
    fwd = under("forward", 0.0, T.planted, 13, 1, 64, 0)
    rev = under("reverse", 0.0, T.planted, 13, 1, 64, 0)
    assert fwd.tolist() == list(range(64)) and rev.tolist() == list(range(63, -1, -1))
    before = stats()["preemptions"]
    shuffled = [under("random", 0.2, T.planted, 13, 1, 64, 0, seed=s) for s in (1, 2)]
    assert sorted(shuffled[0].tolist()) == list(range(64)) and not torch.equal(shuffled[0], shuffled[1])
    assert shuffled[0].tolist() not in (fwd.tolist(), rev.tolist())
    assert stats()["preemptions"] > before


def test_invalid_launches_fail_as_on_a_gpu():
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        T.planted(0, 1, 2048, 0)  # more than 1024 threads per block
    with pytest.raises(RuntimeError, match="invalid argument"):
        T.planted(0, 1, 64, 64 << 10)  # > 48 KiB of dynamic shared memory without the attribute
    assert T.planted(0, 1, 64, 0).shape == (64,)  # and the error state is cleared


# ---- mma.sync m16n8k16 through csrc/cuda/mma.cuh ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", [0, 1], ids=["b_nmajor", "b_kmajor"])
def test_mma_matches_matmul(dtype, variant):
    """mma.cuh's loaders and the emulated mma.sync give A B: each 16-deep step sums exact products
    in fp64 and rounds once to fp32, so three steps are within 2 ulp of the fp64 product."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 48, generator=g).to(dtype)
    b = torch.randn(48, 16, generator=g).to(dtype)
    c = under("random", 0.2, T.gemm, a, b, variant)
    want = a.double() @ b.double()
    torch.testing.assert_close(c.double(), want, rtol=2.5e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_wrong_fragment_index_is_caught(dtype):
    """A kernel that passes A's registers 1 and 2 swapped computes something else."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype)
    c = T.gemm(a, b, 2)
    assert (c.double() - a.double() @ b.double()).abs().max() > 0.5


def test_mma_fragment_layout_element_by_element():
    """One-hot inputs: A[i][k] = 1 and B[k][j] = 1 give C = e_i e_j^T, for every (i, k) and j:
    a layout mistake anywhere moves the one."""
    for i in range(16):
        for k in range(16):
            a = torch.zeros(16, 16, dtype=torch.float16)
            a[i, k] = 1
            b = torch.zeros(16, 8, dtype=torch.float16)
            b[k] = torch.arange(1, 9)
            c = T.gemm(a, b, 0)
            want = torch.zeros(16, 8)
            want[i] = torch.arange(1, 9)
            assert torch.equal(c, want), (i, k)


# ---- numbers: round to nearest even, as cvt.rn ----------------------------------------------------

def _tie_and_edge_floats():
    g = torch.Generator().manual_seed(0)
    bits = [torch.randint(-(2**31), 2**31 - 1, (40000,), generator=g, dtype=torch.int64)]
    exps = torch.arange(0, 255, dtype=torch.int64)
    mant = torch.randint(0, 1 << 23, (255,), generator=g, dtype=torch.int64)
    for low, mask in ((0x8000, 0xFFFF), (0x1000, 0x1FFF)):  # bf16 ties, fp16 (normal) ties
        for odd in (0, 1):
            m = (mant & ~mask) | low | (odd * (mask + 1))
            bits.append((exps << 23) | (m & 0x7FFFFF))
    # fp16's subnormal and normal range, every 4096th float from 2^-26 to 65536: the low 12 bits
    # are 0, so fp16's ties below 2^-14, where the rounding bit is bit 13 or higher, are in
    bits.append(torch.arange(0x32800000, 0x47800001, 4096, dtype=torch.int64))
    bits.append(torch.arange(0x477FE000, 0x47800100, dtype=torch.int64))  # around 65520
    b = torch.cat(bits)
    b = torch.cat([b, b | (1 << 31)])
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65520.0,
                             2.0**-24, 2.0**-25, 3 * 2.0**-26, 3.3895314e38, 3.39e38])
    return torch.cat([(((b + 2**31) % 2**32) - 2**31).to(torch.int32).view(torch.float32), specials])


def test_conversions_round_to_nearest_even():
    x = _tie_and_edge_floats()
    out = under("forward", 0.0, T.convert, x)
    nan = x.isnan()
    for col, dtype in ((0, torch.bfloat16), (1, torch.float16), (2, torch.bfloat16), (3, torch.float16)):
        want = x.to(dtype).view(torch.int16)
        got = out[:, col]
        assert torch.equal(got[~nan], want[~nan]), (dtype, col, x[~nan][got[~nan] != want[~nan]][:5])
        assert (got[nan] == 0x7FFF).all()  # the canonical NaN


# ---- warp collectives and barrier reductions: the CUDA programming guide's definitions ----------

def _warp_expected(x):
    out = torch.zeros(x.numel(), 14, dtype=torch.int64)
    for blk in range(x.numel() // 64):
        xs = x[blk * 64:(blk + 1) * 64].tolist()
        for t in range(64):
            w, lane = t // 32, t % 32
            v = xs[w * 32:(w + 1) * 32]

            def shfl(src, width):
                return v[(lane // width) * width + src % width]

            def up(d, width):
                return v[lane - d] if lane % width >= d else v[lane]

            def down(d, width):
                return v[lane + d] if lane % width + d < width else v[lane]

            def xor(m, width):
                src = lane ^ m
                return v[src] if src // width <= lane // width else v[lane]

            o = out[blk * 64 + t]
            o[0], o[1] = shfl((lane * 7 + 3) % 32, 32), shfl(lane + 5, 8)
            o[2], o[3], o[4], o[5] = up(3, 8), down(5, 16), xor(9, 32), xor(5, 4)
            ballot = sum(1 << i for i, y in enumerate(v) if y & 1)
            o[6] = ballot - (1 << 32) if ballot >= 1 << 31 else ballot
            o[7], o[8] = any(y > 90 for y in v), all(y >= 0 for y in v)
            match = sum(1 << i for i, y in enumerate(v) if y % 4 == v[lane] % 4)
            o[9] = match - (1 << 32) if match >= 1 << 31 else match
            o[10], o[11] = sum(v), max(v)
            o[12] = sum(y & 1 for y in xs)
            o[13] = any(y == 7 for y in xs) + 2 * all(y >= 0 for y in xs)
    return out


@pytest.mark.parametrize("order, preempt", ORDERS)
def test_warp_collectives(order, preempt):
    x = torch.randint(0, 100, (128,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    x[5] = 7
    got = under(order, preempt, T.warp_ops, x)
    assert torch.equal(got.long(), _warp_expected(x))


# ---- bugs planted at run time into the real kernels -------------------------------------------------

def _barrier_line(path, after):
    """The line of the first `__syncthreads();` after the first line that matches `after`."""
    lines = (ROOT / path).read_text().splitlines()
    start = next((i for i, s in enumerate(lines) if re.search(after, s)), None)
    assert start is not None, f"{path}: no line matches {after!r}; update this test"
    line = next((i for i in range(start, len(lines)) if re.search(r"__syncthreads\(\);", lines[i])), None)
    assert line is not None, f"{path}: no __syncthreads(); after {after!r}; update this test"
    return line + 1


def _attention_case():
    am.check_backend("cuda", "cpu", (1, 2, 1, 65, 70, 64), "block_causal_b4", torch.bfloat16,
                     fn=am.direct_op())


def _loss_case():
    loss.check_backend("cpu", *loss.make_inputs(2, 3, 600, dtype=torch.float16))


def _remask_case():
    remask.test_backend_edge_cases("cpu", "k>candidates")
    remask.test_backend_matches_reference("cpu", torch.float32, "low_confidence", (2, 5, 4099))


def _fused_loss_case():
    loss.test_fused_form("cpu", torch.float32, None, bias=False)


SHARED, GLOBAL = r"shared-memory hazard", r"global-memory race"
REAL_BARRIERS = [  # (file, the line at or before the barrier, a run of the kernel, the report)
    ("csrc/cuda/attention.cu", r"load_tile<T, D, kTile>\(Vs, v, n0, p\.Lk\);", _attention_case, SHARED),
    ("csrc/cuda/masked_diffusion_loss.cu", r"if \(lane == 0\) sm\[warp\] = ", _loss_case, SHARED),
    ("csrc/cuda/masked_diffusion_loss.cu", r"x\[t\] is read above", _fused_loss_case, GLOBAL),
    ("csrc/cuda/block_reduce.cuh", r"if \(lane == 0\) smem\[warp\] = v;", _remask_case, SHARED),
    ("csrc/cuda/remask_step.cu", r"if \(threadIdx\.x == 0\) s_count = 0;", _remask_case, SHARED),
]


@pytest.mark.parametrize("path, after, case, report", REAL_BARRIERS,
                         ids=[f"{Path(p).name}-{c.__name__[1:]}" for p, _, c, _ in REAL_BARRIERS])
def test_removed_barrier_in_a_real_kernel_is_reported(path, after, case, report):
    with EmulatedCuda():
        case()  # as written, it passes
    line = _barrier_line(path, after)
    plant("drop_barrier", path, line)
    with pytest.raises(RuntimeError, match=report), EmulatedCuda():
        case()


def test_removed_barrier_in_a_real_kernel_changes_the_result_between_orders():
    """Without the checkers, EmulatedCuda's two thread orders alone catch the attention
    forward's missing barrier after its K and V tiles are loaded."""
    path, after = REAL_BARRIERS[0][:2]
    plant("drop_barrier", path, _barrier_line(path, after))
    with pytest.raises(AssertionError, match="different results"), EmulatedCuda(hazards=False):
        _attention_case()


def test_wrong_fragment_index_in_the_attention_kernel_is_caught():
    """The emulated mma reads A's registers 1 and 2 swapped, as a kernel indexing its fragment
    wrongly would: the attention test's tolerance catches it."""
    with EmulatedCuda():
        _attention_case()  # as written, it passes
    plant("mma_swap_a12")
    with pytest.raises(AssertionError, match="error"), EmulatedCuda():
        _attention_case()


# ---- the source rewriter of csrc/emu/build.py --------------------------------------------------------

def test_rewriter():
    import importlib.util
    spec = importlib.util.spec_from_file_location("llada_emu_build", ROOT / "csrc" / "emu" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    src = '''// a comment with k<<<1, 2>>>(x) and __shared__ int c[4];
const char* s = "__shared__ float t[2]; <<<a, b>>>";
__global__ void k(float* x) {
  extern __shared__ __align__(16) unsigned char dyn[];
  __shared__ __align__(16) float a[4][8], b;
  __shared__ Pair<int, float> p[2];
}
void host(at::Tensor t) {
  TORCH_CHECK(t.is_cuda());
  k<T,
    4><<<grid,
         64, 0, stream>>>(x);
}
TORCH_LIBRARY_IMPL(llada, CUDA, m) {}
'''
    out = build.rewrite(src, "csrc/cuda/x.cu")
    body = out.split("\n", 2)[2]  # after the prelude and the #line directive
    assert out.startswith('#include "llada_emu/cuda_emu.h"\n#line 1 "csrc/cuda/x.cu"\n')
    assert body.count("\n") == src.count("\n")  # line numbers kept
    lines = body.splitlines()
    assert lines[0] == src.splitlines()[0] and lines[1] == src.splitlines()[1]  # comments, strings
    assert "unsigned char (&dyn)[] = *reinterpret_cast<unsigned char (*)[]>(::llada_emu::dynamic_shared());" in lines[3]
    assert ("auto& a = ::llada_emu::static_shared<float[4][8], 16>([] {}); "
            "auto& b = ::llada_emu::static_shared<float, 16>([] {});") in lines[4]
    assert "auto& p = ::llada_emu::static_shared<Pair<int, float>[2], 0>([] {});" in lines[5]
    assert "t.is_cpu()" in lines[8]
    assert lines[10].endswith('4> | ::llada_emu::config("k<T, 4>", grid,')
    assert lines[11].strip() == "64, 0, stream)(x);"
    assert lines[13].startswith("TORCH_LIBRARY_IMPL(llada_emu, CPU, m)")
    with pytest.raises(ValueError, match="cannot rewrite"):
        build.rewrite("__device__ void f() { __shared__ int x = 3; }", "csrc/cuda/y.cu")
