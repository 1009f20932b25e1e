"""Runtime instruction-set dispatch of the C++ CPU kernels (csrc/isa.h): what is reported, the
environment variable, every CPU kernel under every capability this machine supports, and the
guarantee that the DEFAULT copy runs on a CPU without AVX (checked on the linked library)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llada_kernels as lk
import test_masked_diffusion_loss as loss_tests
import test_remask_step as remask_tests

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = lk.cpu_capabilities()
X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    before = lk.cpu_capability()
    torch.ops.llada.cpu_capability(request.param)
    yield request.param
    torch.ops.llada.cpu_capability(before)


def cpu_flags():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# ---- what is reported ----------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads /proc/cpuinfo")
def test_capabilities_follow_the_cpu():
    flags = cpu_flags()
    want = ["DEFAULT"]
    if X86 and {"avx2", "fma", "f16c"} <= flags:
        want.append("AVX2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            want.append("AVX512")
    assert CAPABILITIES == want
    env = os.environ.get("LLADA_CPU_CAPABILITY", "").upper()
    expected = want[-1] if env not in want else env
    assert lk.cpu_capability() == expected


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_environment_variable():
    """One child process: lower names (any case) are used, a bad name is a ValueError at import
    naming the variable. (The children import torch: about as slow as two tests.)"""
    lowest = CAPABILITIES[0].lower()
    p = run_python("import llada_kernels as lk; print(lk.cpu_capability())", LLADA_CPU_CAPABILITY=lowest)
    assert p.returncode == 0 and p.stdout.split()[-1] == "DEFAULT", p.stderr[-2000:]
    p = run_python("import llada_kernels", LLADA_CPU_CAPABILITY="sse4")
    assert p.returncode != 0
    assert "LLADA_CPU_CAPABILITY must be one of DEFAULT, AVX2, AVX512; got 'sse4'" in p.stderr


def test_switching_hook():
    before = lk.cpu_capability()
    try:
        assert torch.ops.llada.cpu_capability("default") == "DEFAULT"
        assert lk.cpu_capability() == "DEFAULT"
        with pytest.raises(ValueError, match="force must be one of DEFAULT, AVX2, AVX512; got 'x'"):
            torch.ops.llada.cpu_capability("x")
        for missing in {"AVX2", "AVX512"} - set(CAPABILITIES):
            with pytest.raises(ValueError, match=f"{missing} is not supported"):
                torch.ops.llada.cpu_capability(missing)
    finally:
        torch.ops.llada.cpu_capability(before)


# ---- every CPU kernel under every capability ---------------------------------------------------
# The ops' own checks (tests/test_<op>.py), run here once per capability with representative
# shapes; tests/test_cpu_attention_masks.py does the same for attention.

@pytest.mark.parametrize("mode", remask_tests.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_remask_step(capability, mode, dtype):
    remask_tests.test_backend_matches_reference("cpu", dtype, mode, (3, 17, 1000))
    remask_tests.test_backend_matches_reference("cpu", dtype, mode, (2, 5, 4099))


@pytest.mark.parametrize("case", ["threshold", "cfg", "suppress+zero_confidence", "strided"])
def test_remask_step_edge_cases(capability, case):
    remask_tests.test_backend_edge_cases("cpu", case)


def test_remask_step_sampling(capability):
    remask_tests.test_random_remasking_picks_uniformly("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_masked_diffusion_loss(capability, dtype):
    loss_tests.test_logits_form("cpu", dtype, (2, 7, 1003))
    loss_tests.test_fused_form("cpu", dtype, 3, True)


def test_attention(capability):
    q, k, v = (torch.randn(2, 4, 70, 32) for _ in range(3))
    mask = torch.rand(2, 70) < 0.8
    for dtype in (torch.float32, torch.bfloat16):
        a, b, c = (x.to(dtype) for x in (q, k, v))
        got = lk.bidirectional_attention(a, b, c, mask, backend="cpu")
        want = lk.bidirectional_attention(a.double(), b.double(), c.double(), mask, backend="reference")
        assert (got.double() - want).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


# ---- the DEFAULT copy runs on the baseline instruction set ------------------------------------

def functions_with_avx(library):
    """Global and weak function symbols of `library` whose code holds an AVX (VEX or EVEX)
    instruction. Local symbols are left out: a file's local functions are compiled with that
    file's flags and called from it alone."""
    nm = subprocess.run(["nm", "--defined-only", str(library)], capture_output=True, text=True,
                        check=True).stdout
    shared = {f[2] for f in map(str.split, nm.splitlines()) if len(f) == 3 and f[1] in "TWVui"}
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)],
                         capture_output=True, text=True, check=True).stdout
    func, found = None, set()
    head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    for line in asm.splitlines():
        m = head.match(line)
        if m:
            func = m.group(1)
        elif func in shared and func not in found and "\t" in line:
            ins = line.split("\t")[-1].strip()
            mnemonic = ins.split()[0] if ins else ""
            if (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or \
                    re.search(r"%[yz]mm|%k[0-7]\b", ins):
                found.add(func)
    return found


def outside_the_avx_copies(functions):
    """Those not in an AVX2 or AVX512 copy's namespace (mangled "4AVX2", "6AVX512")."""
    return sorted(f for f in functions if "4AVX2" not in f and "6AVX512" not in f)


needs_binutils = pytest.mark.skipif(
    not X86 or shutil.which("objdump") is None or shutil.which("nm") is None,
    reason="x86-64 with objdump and nm")


@needs_binutils
def test_default_copy_needs_no_avx():
    """An inline function that several copies emit (a std::vector method, say) is kept once by
    the linker: the DEFAULT copy's, since its objects are linked first. Every shared function
    with AVX code must then belong to an AVX2 or AVX512 copy, and a CPU without AVX that runs
    the DEFAULT kernels never meets one."""
    library = Path(lk._C.__file__)
    assert outside_the_avx_copies(functions_with_avx(library)) == []


@needs_binutils
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_avx_check_catches_a_wrong_link_order(tmp_path):
    """The planted bug: two copies of one file, AVX2 linked first, share an inline function; the
    kept one is the AVX2 build and the check above names it."""
    src = tmp_path / "copy.cpp"
    src.write_text(textwrap.dedent("""
        #include <vector>
        template <class T> __attribute__((noinline)) T total(const std::vector<T>& v) {
          T s = 0; for (T x : v) s += x * x; return s;
        }
        namespace copy { namespace CPU_CAPABILITY {
        float run(int n) { return total(std::vector<float>(n, 1.f)); }
        } }
    """))
    objs = {}
    for cap, flags in (("DEFAULT", []), ("AVX2", ["-mavx2", "-mfma"])):
        objs[cap] = tmp_path / f"{cap}.o"
        subprocess.run(["g++", "-O3", "-fPIC", "-c", f"-DCPU_CAPABILITY={cap}", *flags, str(src),
                        "-o", str(objs[cap])], check=True)
    for order, bad in (((objs["AVX2"], objs["DEFAULT"]), True), ((objs["DEFAULT"], objs["AVX2"]), False)):
        lib = tmp_path / "lib.so"
        subprocess.run(["g++", "-shared", *map(str, order), "-o", str(lib)], check=True)
        offenders = outside_the_avx_copies(functions_with_avx(lib))
        assert bool(offenders) == bad and all("total" in f for f in offenders), offenders


QEMU = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")


@pytest.mark.slow
@pytest.mark.skipif(not X86 or QEMU is None, reason="needs qemu-x86_64 (user mode) to emulate a CPU without AVX")
def test_runs_on_a_cpu_without_avx(tmp_path):
    """The real thing, where qemu is installed: import and run every CPU kernel on an emulated
    Nehalem (SSE4.2, no AVX). numpy is hidden from the child: its wheels need more than that CPU
    has (torch runs without it). About two minutes of emulation."""
    fake = tmp_path / "numpy"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ModuleNotFoundError("numpy is hidden")\n')
    code = textwrap.dedent("""
        import torch, llada_kernels as lk
        assert lk.cpu_capability() == "DEFAULT" and lk.cpu_capabilities() == ["DEFAULT"]
        q, k, v = (torch.randn(1, 2, 70, 32, requires_grad=True) for _ in range(3))
        out = lk.bidirectional_attention(q, k, v, backend="cpu")
        want = lk.bidirectional_attention(q.double(), k.double(), v.double(), backend="reference")
        out.sum().backward()
        assert (out.double() - want).abs().max() < 1e-5 and torch.isfinite(q.grad).all()
        x, n = lk.remask_step(torch.randn(2, 8, 1000), torch.full((2, 8), 7), 3, mask_id=7, backend="cpu")
        assert n.sum() == 6
        lg = torch.randn(2, 8, 100)
        args = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.bool), torch.ones(2))
        a = lk.masked_diffusion_loss(lg, *args, backend="cpu")
        b = lk.masked_diffusion_loss(lg, *args, backend="reference")
        assert abs(a.item() - b.item()) < 1e-3 * abs(b.item())
        print("ran")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
           "OMP_NUM_THREADS": "1"}
    env.pop("LLADA_CPU_CAPABILITY", None)
    p = subprocess.run([QEMU, "-cpu", "Nehalem", sys.executable, "-c", code], capture_output=True,
                       text=True, env=env, timeout=1200)
    assert p.returncode == 0 and p.stdout.strip().endswith("ran"), p.stderr[-3000:]
