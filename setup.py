"""Build llada_kernels and its compiled operator library `llada_kernels._C`.

    pip install --no-build-isolation .        # or -e . for development

Environment:
    LLADA_NO_CUDA=1          build the C++ CPU kernels only, even where nvcc is present.
    LLADA_CUDA_ARCHS="8.0;9.0+PTX"
                             CUDA architectures (TORCH_CUDA_ARCH_LIST syntax). The default
                             is sm_80 and sm_90, plus PTX for sm_90 so newer GPUs can JIT it.
    MAX_JOBS=N               parallel compile jobs (honoured by torch's ninja build).
    CUDA_HOME                the toolkit root; found from `nvcc` on PATH when unset.

CUDA kernels are built whenever the toolchain can build them (nvcc is found and torch is a
CUDA build). Whether this machine has a GPU plays no part.
"""

import os
import re
import runpy
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
# The supported range of torch and Triton (llada_kernels/_versions.py, also checked at import).
VERSIONS = runpy.run_path(str(ROOT / "llada_kernels" / "_versions.py"))


def _sources():
    """The one source list, shared with CMakeLists.txt."""
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def _find_cuda_home():
    """CUDA_HOME if set, else the toolkit root that nvcc itself reports (`#$ TOP=`).

    nvcc on PATH may be a wrapper script, so neither its path nor torch's guess is
    trusted: nvcc's dry run names the real root.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
        m = re.search(r"^#\$ TOP=(.*)$", out.stderr + out.stdout, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _extension():
    cuda_home = None if os.environ.get("LLADA_NO_CUDA") == "1" else _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("LLADA_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if VERSIONS["parse"](torch.__version__) < VERSIONS["parse"](VERSIONS["MIN_TORCH"]):
        raise SystemExit(f"llada_kernels builds against torch >= {VERSIONS['MIN_TORCH']}; "
                         f"this interpreter has torch {torch.__version__}")

    with_cuda = cuda_home is not None and torch.version.cuda is not None
    sources = [s for s in _sources() if with_cuda or not s.endswith(".cu")]
    cxx = ["-O3", "-std=c++20", "-DLLADA_BUILD_PYTHON_MODULE", "-fopenmp"]
    # Triton-free C++ kernels vectorise through ATen's Vectorized<T>, which needs these.
    cxx += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"] \
        if os.uname().machine == "x86_64" else []
    # ptxas -Werror with -warn-spills: a register spill in any kernel fails the build.
    nvcc = ["-O3", "-std=c++20", "-lineinfo", "-DLLADA_WITH_CUDA",
            "--expt-relaxed-constexpr", "-Xptxas=-warn-spills", "-Xptxas=-Werror"]
    kwargs = dict(
        name="llada_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx + (["-DLLADA_WITH_CUDA"] if with_cuda else []), "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
        define_macros=[("Py_LIMITED_API", "0x030A0000")],
        py_limited_api=True,
    )
    ext = CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)
    print(f"llada_kernels: building {'CPU + CUDA' if with_cuda else 'CPU only'} kernels"
          + (f" for {os.environ['TORCH_CUDA_ARCH_LIST']} (CUDA_HOME={cuda_home})" if with_cuda else ""))
    return ext, BuildExtension.with_options(use_ninja=True)


ext, build_ext = _extension()

setup(
    name="llada_kernels",
    version="0.1.0",
    description="Fused kernels for masked diffusion language models (LLaDA)",
    packages=find_packages(include=["llada_kernels", "llada_kernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
    install_requires=[f"torch>={VERSIONS['MIN_TORCH']}", "numpy", "safetensors>=0.4.3"],
    extras_require={"triton": [f"triton>={VERSIONS['MIN_TRITON']}"],
                    "test": ["pytest", "pytest-benchmark"], "cli": ["tokenizers", "tqdm"]},
    entry_points={"console_scripts": ["llada-kernels = llada_kernels.cli:main"]},
)
