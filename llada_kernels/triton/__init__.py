"""Triton kernels (one module per op), their ahead-of-time compile specs, and _compat: what the
oldest supported Triton needs, applied here once, before any kernel runs under the interpreter."""

from .._backend import interpreting as _interpreting

if _interpreting():
    from ._compat import fix_interpreter_index

    fix_interpreter_index()
