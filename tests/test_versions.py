"""The supported torch / Triton range: one definition (llada_kernels/_versions.py) behind the
package metadata, the import-time warning and CI's oldest run; and the one compatibility fix
the oldest Triton needs (llada_kernels/triton/_compat.py), shown needed on a planted copy of
Triton 3.6's interpreter behaviour."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from llada_kernels import _versions

ROOT = Path(__file__).resolve().parents[1]


def test_parse():
    assert _versions.parse("2.11.0+cu130") == (2, 11, 0)
    assert _versions.parse("3.6") == (3, 6, 0)
    assert _versions.parse("2.14.1.dev20260101") == (2, 14, 1)
    assert _versions.parse("2.9.1") < _versions.parse("2.11")
    with pytest.raises(ValueError, match="not a version"):
        _versions.parse("nightly")


def test_running_versions_are_supported():
    assert _versions.check_installed() == []
    assert _versions.parse(torch.__version__) >= _versions.parse(_versions.MIN_TORCH)


def test_old_versions_warn_naming_the_version_and_the_range():
    with pytest.warns(_versions.UnsupportedVersionWarning,
                      match=r"supports torch >= 2\.11 .*found torch 2\.10\.0"):
        problems = _versions.check("2.10.0+cu128", "3.6.0")
    assert len(problems) == 1
    with pytest.warns(_versions.UnsupportedVersionWarning, match=r"triton >= 3\.6 .*triton 3\.5\.1"):
        _versions.check("2.11.0", "3.5.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _versions.check("2.11.0", None) == []  # no Triton installed: nothing to say


def test_metadata_and_ci_pins_follow_the_one_definition():
    setup = (ROOT / "setup.py").read_text()
    assert "torch>={VERSIONS['MIN_TORCH']}" in setup and "triton>={VERSIONS['MIN_TRITON']}" in setup
    oldest = (ROOT / "requirements-oldest.txt").read_text()
    pins = dict(re.findall(r"^(torch|triton)==(\S+)$", oldest, re.M))
    assert _versions.parse(pins["torch"])[:2] == _versions.parse(_versions.MIN_TORCH)[:2]
    assert _versions.parse(pins["triton"])[:2] == _versions.parse(_versions.MIN_TRITON)[:2]
    assert pins["torch"] == _versions.TESTED["torch"][0]
    assert pins["triton"] == _versions.TESTED["triton"][0]
    newest = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert newest == _versions.TESTED["torch"][1]


def test_load_error_of_another_torch_says_so():
    msg = _versions.explain_load_error("_C.abi3.so: undefined symbol: _ZN3c104impl")
    assert "built against another torch" in msg and torch.__version__ in msg
    assert _versions.explain_load_error("No module named 'llada_kernels._C'") == \
        "No module named 'llada_kernels._C'"


# ---- the Triton interpreter fix --------------------------------------------------------------

triton = pytest.importorskip("triton")
interpreter = pytest.importorskip("triton.runtime.interpreter")
from llada_kernels import _backend  # noqa: E402
from llada_kernels.triton import _compat  # noqa: E402

needs_interpreter = pytest.mark.skipif(not _backend.interpreting(), reason="TRITON_INTERPRET=1 is off")

if _backend.interpreting():
    import triton.language as tl

    @triton.jit
    def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out[0] = sum(x[0:n]), in BLOCK tiles: a loop over a runtime scalar, as every kernel
        of the library has (range(0, V, BLOCK_V), ...)."""
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0))


def _run_sum():
    x = torch.arange(37, dtype=torch.float32)
    out = torch.zeros(1)
    _sum_kernel[(1,)](x, out, 37, BLOCK=16)
    return out.item()


def _triton_36_index(self):
    """Triton 3.6's interpreter: int() of the scalar's 1-element array."""
    return int(self.handle.data)


@needs_interpreter
def test_interpreter_runs_loops_over_runtime_scalars():
    assert not _compat.interpreter_index_broken()  # fixed at import, or never broken
    assert _run_sum() == sum(range(37))


@needs_interpreter
@pytest.mark.skipif(np.lib.NumpyVersion(np.__version__) < "2.4.0",
                    reason="NumPy < 2.4 still converts 1-element arrays (with a warning)")
def test_planted_triton_36_interpreter_is_detected_and_fixed(monkeypatch):
    """Plant Triton 3.6's conversion into whichever interpreter runs here: kernels fail with
    the TypeError the issue reports until fix_interpreter_index() patches it back."""
    current = interpreter._patch_lang_tensor

    def triton_36(tensor, scope):
        current(tensor, scope)
        scope.set_attr(tensor, "__index__", _triton_36_index)

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", triton_36)
    assert _compat.interpreter_index_broken()
    with pytest.raises(Exception, match="only 0-dimensional arrays"):
        _run_sum()
    assert _compat.fix_interpreter_index() is True
    assert not _compat.interpreter_index_broken()
    assert _run_sum() == sum(range(37))
    assert _compat.fix_interpreter_index() is False  # idempotent
