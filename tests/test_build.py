"""The build: the CMake build makes a loadable operator library from the same source list,
and CI's build holds the CUDA kernels."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llada_kernels
from llada_kernels import _backend

ROOT = Path(__file__).resolve().parents[1]


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def source_list():
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


def test_every_source_file_is_listed_once():
    listed = source_list()
    assert len(listed) == len(set(listed))
    # csrc/emu is the host emulation of the CUDA kernels, built by csrc/emu/build.py for the tests
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
               if p.suffix in (".cpp", ".cu") and not p.is_relative_to(ROOT / "csrc" / "emu")}
    assert set(listed) == on_disk


def test_compiled_library_loaded():
    assert _backend._C_ERROR is None, _backend._C_ERROR
    for op in ("remask_step", "masked_diffusion_loss", "attention_fwd", "attention_bwd"):
        assert _backend.has_kernel(op, "CPU"), f"llada::{op} has no CPU kernel in this build"


@pytest.mark.skipif(os.environ.get("LLADA_EXPECT_CUDA") != "1",
                    reason="set LLADA_EXPECT_CUDA=1 where the build must include CUDA (CI does)")
def test_cuda_kernels_built():
    assert torch.version.cuda is not None
    for op in ("remask_step", "gumbel_from_bits", "attention_fwd", "attention_bwd"):
        assert _backend.has_kernel(op, "CUDA"), f"llada::{op} has no CUDA kernel in this build"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_loads_the_same_ops(tmp_path):
    """CPU-only CMake build (the CUDA build is proven by setup.py's), loaded in a fresh
    process with torch.ops.load_library: every op of the package must be there."""
    build = tmp_path / "build"
    run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DLLADA_WITH_CUDA=OFF"])
    run(["cmake", "--build", str(build), "-j", os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))])
    lib = next(build.glob("libllada_kernels*.so"))
    # Compare with the setup.py build, each loaded alone in a fresh process, so that kernels
    # registered from Python (Triton twins, composites) count on neither side.
    assert cpu_ops_of(lib) == cpu_ops_of(Path(llada_kernels._C.__file__))
    assert "llada::remask_step" in cpu_ops_of(lib)


def cpu_ops_of(library):
    probe = ("import sys, torch; torch.ops.load_library(sys.argv[1]); "
             "print(' '.join(sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith('llada::') "
             "and torch._C._dispatch_has_kernel_for_dispatch_key(n, 'CPU'))))")
    return run([sys.executable, "-c", probe, str(library)]).split()
