"""Importing llada_kernels refuses a torch that _C was not compiled against (issue 12 item 7):
the torch rule of the one import-time version check (llada_kernels/_versions.py; its range
rule is tests/test_versions.py's)."""

import os
import subprocess
import sys
from pathlib import Path

import warnings

import pytest
import torch

from llada_kernels import _backend, _versions

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("built,built_cuda,running,running_cuda,expected", [
    ("2.14.1+cu130", "13.0", "2.14.1+cu130", "13.0", None),
    ("2.14.1+cu130", None, "2.14.1+cpu", None, None),        # a CPU-only build: CUDA plays no part
    ("2.14.1", None, "2.14.1+cu130", "13.0", None),
    ("2.14.1+cu130", None, "2.13.0+cu130", "13.0", "compiled against torch 2.14.1+cu130, but this is torch 2.13.0+cu130"),
    ("2.14.1", None, "2.14.0", None, "(torch==2.14.1)"),
    ("2.14.1+cu130", "13.0", "2.14.1+cu128", "12.8", "compiled with CUDA 13.0 for torch 2.14.1+cu130, but this torch (2.14.1+cu128) is built with CUDA 12.8"),
    ("2.14.1+cu130", "13.0", "2.14.1+cpu", None, "is built with no CUDA"),
])
def test_mismatch_rules(built, built_cuda, running, running_cuda, expected):
    why = _versions.mismatch(built, built_cuda, running, running_cuda)
    if expected is None:
        assert why is None
    else:
        assert expected in why and "Rebuild it against this torch" in why


def test_one_rule_for_torch(monkeypatch):
    """A recorded build decides for torch (exact release); without one, the supported range
    does: never both messages for one torch."""
    monkeypatch.setattr(_versions, "installed_triton", lambda: _versions.TESTED["triton"][1])
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    monkeypatch.setattr(_versions, "built_against", lambda: ("2.10.0", None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _versions.check_installed() == []
    monkeypatch.setattr(_versions, "built_against", lambda: ("2.14.1", None))
    with pytest.raises(ImportError, match=r"compiled against torch 2\.14\.1, but this is torch 2\.10\.0"):
        _versions.check_installed()
    monkeypatch.setenv(_versions.ALLOW_ENV, "1")
    with pytest.warns(_versions.TorchMismatchWarning) as record:
        problems = _versions.check_installed()
    assert len(problems) == 1 and len(record) == 1
    monkeypatch.setattr(_versions, "built_against", lambda: None)  # nothing built: the range
    with pytest.warns(_versions.UnsupportedVersionWarning, match="supports torch >= ") as record:
        assert len(_versions.check_installed()) == 1
    assert len(record) == 1


def _import_with_build_info(version, cuda=None, env=None):
    """Import llada_kernels in a fresh interpreter whose recorded build torch is `version`."""
    code = ("import sys, types; m = types.ModuleType('llada_kernels._build_info'); "
            f"m.TORCH_VERSION = {version!r}; m.TORCH_CUDA = {cuda!r}; "
            "sys.modules['llada_kernels._build_info'] = m; import llada_kernels; print('imported')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_import_refuses_another_torch_release():
    r = _import_with_build_info("2.13.0+cu130")
    assert r.returncode != 0 and "imported" not in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: llada_kernels._C was compiled against torch 2.13.0+cu130, "
                           f"but this is torch {torch.__version__}")
    assert "LLADA_ALLOW_TORCH_MISMATCH=1 loads it anyway" in last


def test_override_warns_and_imports():
    r = _import_with_build_info("2.13.0", env={"LLADA_ALLOW_TORCH_MISMATCH": "1"})
    assert r.returncode == 0 and "imported" in r.stdout
    assert "TorchMismatchWarning" in r.stderr


def test_import_accepts_the_matching_torch():
    r = _import_with_build_info(torch.__version__)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr


@pytest.mark.skipif(_backend._C_ERROR is not None, reason="llada_kernels._C not built")
def test_the_build_recorded_this_torch():
    """setup.py's build_ext wrote _build_info.py beside _C (a CMake build writes none)."""
    from llada_kernels import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert _build_info.TORCH_CUDA in (None, torch.version.cuda)
    assert (_build_info.TORCH_CUDA is not None) == _backend.has_kernel("remask_step", "CUDA")
