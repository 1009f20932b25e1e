"""The supported range of torch and Triton, in one place (setup.py reads it too).

The oldest versions are exercised by CI's second run (`make test-oldest`, requirements-oldest.txt);
the newest by its main run (requirements.txt). Older versions are refused by pip through the
package metadata; a process that imports llada_kernels next to one anyway gets a warning
naming the version and the range, rather than an obscure failure later.

No imports of torch or triton at module level: setup.py executes this file on its own.
"""

from __future__ import annotations

import re
import warnings

MIN_TORCH = "2.11"
MIN_TRITON = "3.6"
TESTED = {"torch": ("2.11.0", "2.14.1"), "triton": ("3.6.0", "3.8.0")}  # oldest, newest in CI


class UnsupportedVersionWarning(UserWarning):
    """torch or Triton is older than llada_kernels supports."""


def parse(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "2.11.0+cu130" or "3.6.0.dev1"."""
    parts = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    if parts is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p or 0) for p in parts.groups())


def check(torch_version: str, triton_version: str | None) -> list[str]:
    """Warn (UnsupportedVersionWarning) for each version below the supported range; return the
    messages."""
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


def installed_triton() -> str | None:
    """The installed Triton's version, read from its metadata (Triton is not imported)."""
    from importlib import metadata

    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


def check_installed() -> list[str]:
    import torch

    return check(torch.__version__, installed_triton())


def explain_load_error(error: str) -> str:
    """The extension's load error, with the likely cause when it is a torch mismatch (an
    extension built against one torch and loaded by another fails on undefined symbols)."""
    if "undefined symbol" not in error:
        return error
    import torch

    return (f"{error} -- llada_kernels._C was probably built against another torch than this "
            f"one ({torch.__version__}); rebuild it with this interpreter, e.g. "
            "`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`")
