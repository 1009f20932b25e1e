"""Argument checks, done once in Python before any backend runs.

Every message names the op, the argument, what was expected and what was given. Shape and
dtype checks cost nothing. Value checks (a tensor's contents) run on the host: free for CPU
tensors, one synchronisation for CUDA tensors. They are skipped while torch.compile traces,
and LLADA_CHECK_VALUES=0 turns them off everywhere (kernels stay safe either way: they clamp,
they never index out of bounds).
"""

from __future__ import annotations

import math
import numbers
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
    """An iterable of ints (Python or numpy ints, or a 1-D integer tensor) in [0, size)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            fail(op, f"{name} must be an iterable of ints; got a {str(ids.dtype).removeprefix('torch.')} "
                     f"tensor of shape {list(ids.shape)}", TypeError)
        ids = ids.reshape(-1).tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        fail(op, f"{name} must be an iterable of ints; got {type(ids).__name__} {ids!r}", TypeError)
    out = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            fail(op, f"{name} must hold ints; got {type(i).__name__} {i!r}", TypeError)
        if not 0 <= i < size:
            fail(op, f"{name} holds {i}, outside the vocabulary [0, {size})")
        out.append(int(i))
    return out


def check_int(op: str, name: str, value, lo: int, hi: int) -> int:
    """A Python or numpy int (not a bool) in [lo, hi]; returns it as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(op, f"{name} must be an int; got {type(value).__name__} {value!r}", TypeError)
    if not lo <= value <= hi:
        fail(op, f"{name} must be in [{lo}, {'2^63 - 1' if hi == 2**63 - 1 else hi}]; got {value}")
    return int(value)


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_real(op: str, name: str, value, *, finite: bool = True, lo: float | None = None,
               f32: bool = False) -> float:
    """A Python or numpy real number (not a bool, not a tensor: reading a tensor would cost a
    host sync), never NaN, finite unless finite=False (with f32, finite as a float32: the
    kernels compute with it in float32), and >= lo if given; returns a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(op, f"{name} must be a real number; got {type(value).__name__} {value!r}", TypeError)
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        fail(op, f"{name} must be a {'finite ' if finite else ''}real number; got {value}")
    if f32 and abs(value) > FLOAT32_MAX:
        fail(op, f"{name} must be finite in float32 (|{name}| <= {FLOAT32_MAX:.7g}), the dtype "
                 f"the kernels compute in; got {value}")
    if lo is not None and not value >= lo:
        fail(op, f"{name} must be >= {lo}; got {value}")
    return value


def check_generator(op: str, name: str, generator, device: torch.device, ref_name: str):
    """None, or a torch.Generator on `device` (a CUDA generator's device has an index)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        fail(op, f"{name} must be a torch.Generator or None; got {type(generator).__name__} "
                 f"{generator!r}", TypeError)
    gen_device = generator.device
    same = gen_device.type == device.type and (
        gen_device.index is None or device.index is None or gen_device.index == device.index)
    if not same:
        fail(op, f"{name} is on {gen_device} but {ref_name} is on {device}; a torch.Generator on "
                 f"{ref_name}'s device is required")


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


def check_positive_finite(op: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None):
    """Every element finite and > 0 with a finite reciprocal (a value check), in `dtype` when
    given: the values the kernels compute with, after the cast. So in float32, 1e-300 (which
    becomes 0), 1e300 (inf) and 1e-39 (whose reciprocal overflows) are all refused."""
    if not values_checked() or not t.numel():
        return
    t = t.detach()
    used = t if dtype is None else t.to(dtype)
    bad = ~(torch.isfinite(used) & (used > 0) & torch.isfinite(used.reciprocal()))
    if bool(bad.any()):
        where = tuple(torch.nonzero(bad)[0].tolist())
        got = f"{t[where].item()} at {list(where)}"
        if used.dtype != t.dtype:
            got += f", which is {used[where].item()} in {_name(used.dtype)}"
        fail(op, f"{name} must be finite and > 0 with a finite reciprocal in {_name(used.dtype)}"
                 f"{' (the dtype the op computes in)' if dtype is not None else ''}; got {got}")


def check_nonnegative_finite(op: str, name: str, t: torch.Tensor, dtype: torch.dtype | None = None):
    """Every element finite and >= 0 (a value check), in `dtype` when given (after the cast)."""
    if not values_checked() or not t.numel():
        return
    t = t.detach()
    used = t if dtype is None else t.to(dtype)
    bad = ~(torch.isfinite(used) & (used >= 0))
    if bool(bad.any()):
        where = tuple(torch.nonzero(bad)[0].tolist())
        fail(op, f"{name} must be finite and >= 0"
                 f"{f' in {_name(used.dtype)}' if dtype is not None else ''}; got "
                 f"{t[where].item()} at {list(where)}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_in(op: str, name: str, value, allowed: Sequence, context: str = ""):
    """value is one of `allowed`; `context` says who restricts it (e.g. " on the cuda backend")."""
    if value not in allowed:
        fail(op, f"{name} must be one of {list(allowed)}{context}; got {value!r}")


def check_multiple(op: str, name: str, value: int, divisor: int, divisor_name: str):
    """value is a positive multiple of divisor (e.g. query heads of KV heads)."""
    if divisor <= 0 or value % divisor != 0:
        fail(op, f"{name} ({value}) must be a multiple of {divisor_name} ({divisor})")
