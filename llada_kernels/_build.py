"""The torch that llada_kernels._C was compiled against, checked against the running one.

The extension is built on torch's C++ API (ATen tensors, the dispatcher, at::vec), which has
no stable ABI across torch releases: an extension built for one release and loaded by another
can fail on an undefined symbol or, worse, load and misbehave. So the build records the torch
it compiled against (setup.py writes llada_kernels/_build_info.py beside _C), and importing
llada_kernels refuses, with an ImportError that names both versions, a torch whose release
(major.minor.patch) differs, or, when _C holds CUDA kernels, whose CUDA version differs.
LLADA_ALLOW_TORCH_MISMATCH=1 turns the refusal into a warning (at your own risk).

A build without _build_info.py (CMake, or a build from before this check), or a checkout
without _C, is not checked.
"""

from __future__ import annotations

import os
import re
import warnings

ALLOW_ENV = "LLADA_ALLOW_TORCH_MISMATCH"


class TorchMismatchWarning(UserWarning):
    """llada_kernels._C was built against another torch, and LLADA_ALLOW_TORCH_MISMATCH=1."""


def release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of "2.14.1+cu130", "2.15.0.dev20260101", ..."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        raise ValueError(f"not a torch version: {version!r}")
    return tuple(int(g or 0) for g in m.groups())


def mismatch(built_torch: str, built_cuda: str | None, torch_version: str,
             torch_cuda: str | None) -> str | None:
    """Why an extension built against (built_torch, built_cuda: None for a CPU-only build)
    cannot be loaded by (torch_version, torch_cuda), or None when it can."""
    if release(built_torch) != release(torch_version):
        return (f"llada_kernels._C was compiled against torch {built_torch}, but this is torch "
                f"{torch_version}; the extension uses torch's C++ API, which changes between "
                "releases. Rebuild it against this torch (`pip install --no-build-isolation "
                "--force-reinstall --no-deps llada_kernels` from source, or `python setup.py "
                "build_ext --inplace` in a checkout), or install the torch it was built for "
                f"(torch=={'.'.join(map(str, release(built_torch)))})")
    if built_cuda is not None and built_cuda != torch_cuda:
        return (f"llada_kernels._C holds CUDA kernels compiled with CUDA {built_cuda} for torch "
                f"{built_torch}, but this torch ({torch_version}) is built with "
                f"{'CUDA ' + torch_cuda if torch_cuda else 'no CUDA'}. Rebuild it against this "
                "torch, or set LLADA_NO_CUDA=1 when building for a CPU-only torch")
    return None


def check_torch() -> str | None:
    """Refuse (ImportError) a running torch that _C was not built for; None when it matches
    or when the build recorded nothing. With LLADA_ALLOW_TORCH_MISMATCH=1: warn, return why."""
    import importlib.util

    if importlib.util.find_spec(f"{__package__}._C") is None:  # not built (or cleaned): no check
        return None
    try:
        from . import _build_info
    except ImportError:
        return None
    import torch

    why = mismatch(_build_info.TORCH_VERSION, _build_info.TORCH_CUDA, torch.__version__,
                   torch.version.cuda)
    if why is None:
        return None
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(f"{why} ({ALLOW_ENV}=1: loading it anyway)", TorchMismatchWarning,
                      stacklevel=3)
        return why
    raise ImportError(f"{why}. ({ALLOW_ENV}=1 loads it anyway, at your own risk.)")
