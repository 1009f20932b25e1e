"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, at every launch
configuration its launcher uses (the modules' AOT_SPECS), with no register spills.

No GPU is needed. The compile runs in one subprocess without TRITON_INTERPRET: kernels
decorated under the interpreter cannot be compiled, and the interpreter switch of this test
session must not leak into (or be changed by) the compile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

import llada_kernels  # noqa: E402
from llada_kernels.triton import _aot  # noqa: E402

SPECS = _aot.collect_specs()
NAMES = [s.name for s in SPECS]


@pytest.fixture(scope="module")
def compiled():
    """{(name, capability): the result dict of _aot.compile_all} for every spec."""
    root = str(Path(llada_kernels.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "llada_kernels.triton._aot", "--json",
           "--arch", *map(str, _aot.CAPABILITIES)]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}"
    return {(r["name"], r["capability"]): r for r in json.loads(out.stdout)}


def test_spec_names_are_unique():
    assert len(NAMES) == len(set(NAMES)), sorted(n for n in NAMES if NAMES.count(n) > 1)


@pytest.mark.parametrize("capability", _aot.CAPABILITIES, ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("name", NAMES)
def test_compiles_without_spills(compiled, name, capability):
    r = compiled[(name, capability)]
    assert "error" not in r, f"{name} does not compile for sm_{capability}: {r['error']}"
    assert r["spills"] == 0, (f"{name} spills on sm_{capability}: {r['spill_stores']} B stored, "
                              f"{r['spill_loads']} B loaded, {r['registers']} registers")
