"""Which implementation runs an op: one small module that every public op asks.

Backends:
    reference  eager PyTorch (llada_kernels/reference): the definition the others are tested
               against. Any device.
    cpu        C++ kernels in llada_kernels._C. CPU tensors.
    triton     Triton kernels. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1.
    cuda       CUDA C++ kernels in llada_kernels._C, when the wheel was built with nvcc.

Choice, first match wins: the op's `backend=` argument, then the LLADA_BACKEND environment
variable, then the device default (cpu for CPU tensors, triton for CUDA tensors). The Triton
kernels are the GPU default because they are the GPU path whose numerics CI verifies (under
the Triton interpreter) and whose compiled code CI inspects for sm_80 and sm_90; the CUDA C++
kernels compile in CI but have not yet run on a GPU. See the support matrix in README.md.

A backend that cannot run the call raises BackendUnavailable. Nothing falls back silently.

The C++ CPU kernels are compiled for several instruction sets (csrc/isa.h): DEFAULT (any x86-64
or other CPU), AVX2 and AVX512. The best one this CPU supports runs, or a lower one named by the
environment variable LLADA_CPU_CAPABILITY (read when the first CPU kernel runs);
cpu_capability() says which.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
ENV_VAR = "LLADA_BACKEND"

_C_ERROR: str | None = None  # why llada_kernels._C failed to load, if it did
CPU_CAPABILITY_ENV = "LLADA_CPU_CAPABILITY"
CPU_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run this call (not built, wrong device, no Triton)."""


def _triton_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a test dependency
        return f"triton is not installed ({e})"
    return None


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "cpu"


@torch.compiler.assume_constant_result  # torch.compile cannot trace the dispatcher query
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when llada::<op> has a kernel for `dispatch_key` ("CPU", "CUDA")."""
    return _C_ERROR is None and _dispatcher_has_kernel(op, dispatch_key)


@functools.cache  # the query costs ~10 us a call; the C++ kernels are all registered by _C's load
def _dispatcher_has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"llada::{op}", dispatch_key)


def resolve(op: str, requested: str | None, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device`, or BackendUnavailable."""
    name = requested if requested is not None else os.environ.get(ENV_VAR) or default_backend(device)
    source = ("backend=" if requested is not None
              else f"{ENV_VAR}=" if os.environ.get(ENV_VAR) else "the device default")
    if name not in BACKENDS:
        raise ValueError(f"{op}: {source}{name!r} is not a backend; expected one of {BACKENDS}")
    why = _unavailable(op, name, device)
    if why is not None:
        raise BackendUnavailable(f"{op}: backend {name!r} (chosen by {source.rstrip('=')}) cannot "
                                 f"run on {device.type} tensors: {why}")
    return name


def _unavailable(op: str, name: str, device: torch.device) -> str | None:
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if _C_ERROR is not None:
            return f"llada_kernels._C did not load ({_C_ERROR})"
        if device.type != name:
            return f"the {name} backend takes {name} tensors"
        if not has_kernel(op, name.upper()):
            return ("this build has no CUDA kernels (built without nvcc or with LLADA_NO_CUDA=1)"
                    if name == "cuda" else "no CPU kernel is registered")
        return None
    # triton
    why = _triton_error()
    if why is not None:
        return why
    if device.type == "cpu" and not interpreting():
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return "Triton takes CUDA tensors"
    if _C_ERROR is not None:
        return f"llada_kernels._C did not load ({_C_ERROR}); it holds the op schemas"
    return None


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """The backends that can run `op` on `device` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS if _unavailable(op, b, device) is None]


def cpu_capability() -> str | None:
    """The instruction set the C++ CPU kernels run with: "DEFAULT", "AVX2" or "AVX512" (the best
    this CPU supports, or the lower one named by LLADA_CPU_CAPABILITY). None when
    llada_kernels._C did not load."""
    return None if _C_ERROR is not None else torch.ops.llada.cpu_capability()


def cpu_capabilities() -> list[str]:
    """The instruction sets this CPU and this build support, lowest first ([] without _C)."""
    return [] if _C_ERROR is not None else list(torch.ops.llada.cpu_capabilities())


def check_cpu_capability_env() -> None:
    """LLADA_CPU_CAPABILITY, checked when the package is imported: a name that is not a
    capability is a ValueError; one this CPU lacks gives a warning (the best it has is used)."""
    value = os.environ.get(CPU_CAPABILITY_ENV)
    if not value or _C_ERROR is not None:
        return
    if value.upper() not in CPU_CAPABILITIES:
        raise ValueError(f"{CPU_CAPABILITY_ENV} must be one of {', '.join(CPU_CAPABILITIES)}; "
                         f"got {value!r}")
    supported = cpu_capabilities()
    if value.upper() not in supported:
        import warnings
        warnings.warn(f"{CPU_CAPABILITY_ENV}={value}: this CPU supports {', '.join(supported)}; "
                      f"the CPU kernels use {supported[-1]}", RuntimeWarning, stacklevel=3)
