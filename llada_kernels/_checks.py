"""Argument checks, done once in Python before any backend runs.

Every message names the op, the argument, what was expected and what was given. Shape and
dtype checks cost nothing. Value checks (a tensor's contents) run on the host: free for CPU
tensors, one synchronisation for CUDA tensors. They are skipped while torch.compile traces,
and LLADA_CHECK_VALUES=0 turns them off everywhere (kernels stay safe either way: they clamp,
they never index out of bounds).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fail(op: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"{op}: {msg}")


def check_tensor(op: str, name: str, t, *, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | None = None):
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        fail(op, f"{name} must have dtype {names}; got {str(t.dtype).removeprefix('torch.')}", TypeError)
    if ndim is not None and t.dim() != ndim:
        fail(op, f"{name} must have {ndim} dimensions; got {t.dim()} (shape {list(t.shape)})")


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int | str]):
    """`expected` mixes sizes and symbols, e.g. (B, L, "V") for messages; ints must match."""
    shape = tuple(t.shape)
    ok = len(shape) == len(expected) and all(
        isinstance(e, str) or s == e for s, e in zip(shape, expected))
    if not ok:
        fail(op, f"{name} must have shape {list(expected)}; got {list(shape)}")


def check_device(op: str, name: str, t: torch.Tensor, device: torch.device, ref_name: str):
    if t.device != device:
        fail(op, f"{name} is on {t.device} but {ref_name} is on {device}; they must share a device")


def check_ids(op: str, name: str, ids: Iterable[int], size: int) -> list[int]:
    out = []
    for i in ids:
        if isinstance(i, torch.Tensor):
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, int):
            fail(op, f"{name} must hold ints; got {type(i).__name__}", TypeError)
        if not 0 <= i < size:
            fail(op, f"{name} holds {i}, outside the vocabulary [0, {size})")
        out.append(i)
    return out


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension is contiguous, else a contiguous copy (kernels index
    the other dimensions through strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def values_checked() -> bool:
    if os.environ.get("LLADA_CHECK_VALUES", "1") == "0":
        return False
    return not torch.compiler.is_compiling()


def check_min(op: str, name: str, t: torch.Tensor, lo: int):
    """Every element >= lo (a value check: see the module docstring)."""
    if values_checked() and t.numel() and bool((t < lo).any()):
        bad = t[t < lo][0].item()
        fail(op, f"{name} must be >= {lo}; got {bad}")


def check_index(op: str, name: str, t: torch.Tensor, size: int, where: torch.Tensor | None = None):
    """Every element (where `where` is true, if given) in [0, size) (a value check)."""
    if not values_checked() or not t.numel():
        return
    bad = (t < 0) | (t >= size)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        fail(op, f"{name} holds {t[bad][0].item()}, outside the vocabulary [0, {size})"
             + (" at a masked position" if where is not None else ""))


def check_positive_finite(op: str, name: str, t: torch.Tensor):
    """Every element finite and > 0 (a value check)."""
    if not values_checked() or not t.numel():
        return
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        fail(op, f"{name} must be finite and > 0; got {t[bad][0].item()}")


def check_in(op: str, name: str, value, allowed: Sequence, context: str = ""):
    """value is one of `allowed`; `context` says who restricts it (e.g. " on the cuda backend")."""
    if value not in allowed:
        fail(op, f"{name} must be one of {list(allowed)}{context}; got {value!r}")


def check_multiple(op: str, name: str, value: int, divisor: int, divisor_name: str):
    """value is a positive multiple of divisor (e.g. query heads of KV heads)."""
    if divisor <= 0 or value % divisor != 0:
        fail(op, f"{name} ({value}) must be a multiple of {divisor_name} ({divisor})")
