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

The CPU kernels (every csrc/cpu/*.cpp) are compiled once per CPU capability, DEFAULT, AVX2 and
AVX512 on x86-64 (DEFAULT elsewhere), into the one library; the copy that runs is chosen when it
loads (csrc/isa.h). The machine that builds plays no part either: the wheel runs on any x86-64.
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


# The flags of each CPU capability, as ATen compiles its own kernels (CMakeLists.txt has the same
# table). The DEFAULT copy comes first: it is linked first (see csrc/isa.h).
ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def _sources():
    """The one source list, shared with CMakeLists.txt."""
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def _is_cpu_kernel(path):
    """Files under csrc/cpu/ are compiled once per CPU capability."""
    return path.startswith("csrc/cpu/") and path.endswith(".cpp")


def _capabilities():
    return list(ISA_FLAGS) if os.uname().machine in ("x86_64", "AMD64") else ["DEFAULT"]


def _build_ext_class(base):
    class BuildExtension(base):
        """torch's BuildExtension, plus one compile of the CPU kernel files per capability, each
        into its own folder with its own flags; the objects are linked after the other sources,
        DEFAULT first."""

        def build_extension(self, ext):
            kernels = getattr(ext, "llada_cpu_kernels", [])
            if kernels:
                objects = []
                for cap in _capabilities():
                    flags = [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", *ISA_FLAGS[cap]]
                    args = dict(ext.extra_compile_args)
                    args["cxx"] = list(args["cxx"]) + flags
                    objects += self.compiler.compile(
                        kernels, output_dir=os.path.join(self.build_temp, f"isa_{cap}"),
                        macros=ext.define_macros, include_dirs=ext.include_dirs,
                        debug=self.debug, extra_postargs=args, depends=ext.depends)
                ext.extra_objects = objects + [o for o in ext.extra_objects if o not in objects]
            super().build_extension(ext)

    return BuildExtension


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
    kernels = [s for s in sources if _is_cpu_kernel(s)]
    sources = [s for s in sources if not _is_cpu_kernel(s)]
    cxx = ["-O3", "-std=c++20", "-DLLADA_BUILD_PYTHON_MODULE", "-fopenmp"]
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
    ext.llada_cpu_kernels = kernels
    print(f"llada_kernels: building {'CPU + CUDA' if with_cuda else 'CPU only'} kernels"
          + (f" for {os.environ['TORCH_CUDA_ARCH_LIST']} (CUDA_HOME={cuda_home})" if with_cuda else "")
          + f"; CPU kernels for {', '.join(_capabilities())}")
    return ext, _build_ext_class(BuildExtension).with_options(use_ninja=True)


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
