"""What the oldest supported Triton (3.6) needs, in one place, so the kernels stay version-free.

The Triton 3.6 interpreter (TRITON_INTERPRET=1) turns a scalar into a Python int with
`int(handle.data)`, and a scalar's data there is a 1-element array. NumPy 2.4 made that a
TypeError ("only 0-dimensional arrays can be converted to Python scalars"), so every
`range(0, n, BLOCK)` over a runtime argument `n` fails under the interpreter. Triton 3.7 and
later convert `handle.data.squeeze()`. fix_interpreter_index() gives an interpreter that needs
it the same conversion; whether one needs it is found by trying it, not from version numbers,
so the fix switches itself off where Triton or NumPy do not need it. Compiled kernels (GPU)
never go through this code.
"""

from __future__ import annotations

import operator

_FIXED = "_llada_index_fixed"


def _index(self):
    return int(self.handle.data.squeeze())


def interpreter_index_broken() -> bool:
    """True when the interpreter's scalar -> int conversion fails on a 1-element scalar."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(tl.tensor, scope)
        scalar = tl.tensor(interpreter.TensorHandle(np.array([3], dtype=np.int32), tl.int32),
                           tl.int32)
        return operator.index(scalar) != 3
    except TypeError:
        return True
    finally:
        scope.restore()


def fix_interpreter_index() -> bool:
    """Patch the interpreter's scalar -> int conversion where it is broken; True if patched.

    Only the interpreter's per-launch patch of tl.tensor is wrapped: after Triton's own
    patches, __index__ is set to int(data.squeeze()), as Triton 3.7+ does. Idempotent.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton, or one without an interpreter: nothing to fix
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, _FIXED, False):
        return False
    try:
        if not interpreter_index_broken():
            return False
    except Exception:  # noqa: BLE001  (an interpreter whose internals differ: leave it alone)
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    setattr(_patch_lang_tensor, _FIXED, True)
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
