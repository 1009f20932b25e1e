"""Which torch and Triton llada_kernels runs with, in one place (setup.py reads it too), and
the one version check that importing the package makes.

The supported range: the oldest versions are exercised by CI's second run (`make test-oldest`,
requirements-oldest.txt), the newest by its main run (requirements.txt). Older versions are
refused by pip through the package metadata.

The import-time check (check_installed), one rule per package:
  * torch, when llada_kernels._C is there and its build recorded the torch it was compiled
    against (setup.py's build_ext writes llada_kernels/_build_info.py beside _C): the running
    torch must be that release (major.minor.patch) and, when _C holds CUDA kernels, have that
    CUDA version, since the extension uses torch's C++ API, which has no stable ABI across
    releases (an extension built for one release and loaded by another can fail on an
    undefined symbol or, worse, load and misbehave). A mismatch is an ImportError naming both
    versions; LLADA_ALLOW_TORCH_MISMATCH=1 turns it into a TorchMismatchWarning.
  * torch otherwise (a checkout not built, a CMake build, which records nothing), and Triton
    (pure Python, no ABI tie): below the supported range is an UnsupportedVersionWarning naming
    the version and the range, rather than an obscure failure later.

No imports of torch or triton at module level: setup.py executes this file on its own.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings

MIN_TORCH = "2.11"
MIN_TRITON = "3.6"
TESTED = {"torch": ("2.11.0", "2.14.1"), "triton": ("3.6.0", "3.8.0")}  # oldest, newest in CI


ALLOW_ENV = "LLADA_ALLOW_TORCH_MISMATCH"


class UnsupportedVersionWarning(UserWarning):
    """torch or Triton is older than llada_kernels supports."""


class TorchMismatchWarning(UserWarning):
    """llada_kernels._C was built against another torch, and LLADA_ALLOW_TORCH_MISMATCH=1."""


def parse(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "2.11.0+cu130" or "3.6.0.dev1"."""
    parts = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if parts is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p or 0) for p in parts.groups())


def check(torch_version: str | None, triton_version: str | None) -> list[str]:
    """Warn (UnsupportedVersionWarning) for each version below the supported range; return the
    messages. A version of None (not installed) is not checked."""
    problems = []
    for name, found, least in (("torch", torch_version, MIN_TORCH),
                               ("triton", triton_version, MIN_TRITON)):
        if found is not None and parse(found) < parse(least):
            problems.append(
                f"llada_kernels supports {name} >= {least} (tested {TESTED[name][0]} to "
                f"{TESTED[name][1]}); found {name} {found}. Upgrade {name}, or expect failures "
                f"({'the compiled extension must also be rebuilt against it' if name == 'torch' else 'the Triton backend and its interpreter'}).")
    for message in problems:
        warnings.warn(message, UnsupportedVersionWarning, stacklevel=3)
    return problems


def mismatch(built_torch: str, built_cuda: str | None, torch_version: str,
             torch_cuda: str | None) -> str | None:
    """Why an extension built against (built_torch, built_cuda: None for a CPU-only build)
    cannot be loaded by (torch_version, torch_cuda), or None when it can."""
    if parse(built_torch) != parse(torch_version):
        return (f"llada_kernels._C was compiled against torch {built_torch}, but this is torch "
                f"{torch_version}; the extension uses torch's C++ API, which changes between "
                "releases. Rebuild it against this torch (`pip install --no-build-isolation "
                "--force-reinstall --no-deps llada_kernels` from source, or `python setup.py "
                "build_ext --inplace` in a checkout), or install the torch it was built for "
                f"(torch=={'.'.join(map(str, parse(built_torch)))})")
    if built_cuda is not None and built_cuda != torch_cuda:
        return (f"llada_kernels._C holds CUDA kernels compiled with CUDA {built_cuda} for torch "
                f"{built_torch}, but this torch ({torch_version}) is built with "
                f"{'CUDA ' + torch_cuda if torch_cuda else 'no CUDA'}. Rebuild it against this "
                "torch, or set LLADA_NO_CUDA=1 when building for a CPU-only torch")
    return None


def built_against() -> tuple[str, str | None] | None:
    """(torch version, CUDA version or None) that llada_kernels._C was compiled against, or None
    when there is no _C (a checkout not built, or cleaned: a stale _build_info.py is ignored)
    or its build recorded nothing (CMake)."""
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None
    try:
        info = importlib.import_module(f"{__package__}._build_info")
    except ImportError:
        return None
    return info.TORCH_VERSION, info.TORCH_CUDA


def installed_triton() -> str | None:
    """The installed Triton's version, read from its metadata (Triton is not imported)."""
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def check_installed() -> list[str]:
    """The import-time check (the module's docstring): ImportError for a torch that _C was not
    compiled for; warnings for versions below the range; returns what it warned about."""
    import torch

    built = built_against()
    if built is None:
        return check(torch.__version__, installed_triton())
    problems = check(None, installed_triton())  # torch: the build's rule replaces the range's
    why = mismatch(*built, torch.__version__, torch.version.cuda)
    if why is None:
        return problems
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(f"{why} ({ALLOW_ENV}=1: loading it anyway)", TorchMismatchWarning,
                      stacklevel=2)
        return problems + [why]
    raise ImportError(f"{why}. ({ALLOW_ENV}=1 loads it anyway, at your own risk.)")


def explain_load_error(error: str) -> str:
    """The extension's load error, with the likely cause when it is a torch mismatch (an
    extension built against one torch and loaded by another fails on undefined symbols)."""
    if "undefined symbol" not in error:
        return error
    import torch

    return (f"{error} -- llada_kernels._C was probably built against another torch than this "
            f"one ({torch.__version__}); rebuild it with this interpreter, e.g. "
            "`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`")
