"""The GPU check without a GPU: tests/gpu collects (every op, both GPU backends), and
tests/gpu/run.sh's logic holds (--dry-run: every stage but the build and the GPU work).

The planted runs show the runner reporting what it must: a failing test fails the check (and
the stages after it still run), a hanging test is cut by its stage's time box while the
results of the tests before it survive, and the report keeps only the GPU benchmark rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "gpu" / "run.sh"
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
import report  # noqa: E402  (tests/gpu/report.py)


def run_dry(tmp_path, **env):
    out_dir = tmp_path / "out"
    full_env = {**os.environ, "OUT": str(out_dir), "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(RUN), "--dry-run"], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    summary = json.loads((out_dir / "summary.json").read_text())
    return proc, summary, out_dir


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """run.sh --dry-run on tests/gpu, once for the tests below."""
    return run_dry(tmp_path_factory.mktemp("dry"))


def test_dry_run_passes_with_every_gpu_test_skipped(dry_run):
    proc, summary, out_dir = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert summary["ok"]
    assert [s["name"] for s in summary["stages"]] == ["env", "build", "tests", "contract",
                                                      "bench-collect"]
    tests = summary["tests"]
    junit = ET.parse(out_dir / "tests.xml").getroot()
    assert tests["total"] == len(list(junit.iter("testcase"))) > 250
    assert tests["skipped"] == tests["total"]
    assert summary["machine"]["torch"] and summary["machine"]["cuda_available"] is False
    assert "GPU check: PASS" in (out_dir / "run.log").read_text()


def test_gpu_tests_cover_every_op_on_both_backends(dry_run):
    ids = [r["nodeid"] for r in dry_run[1]["tests"]["results"]]
    for module, test in [("test_attention_gpu", "test_matches_reference"),
                         ("test_attention_gpu", "test_offsets_beyond_int32"),
                         ("test_masked_diffusion_loss_gpu", "test_logits_form"),
                         ("test_masked_diffusion_loss_gpu", "test_fused_form"),
                         ("test_masked_diffusion_loss_gpu", "test_offsets_beyond_int32"),
                         ("test_remask_step_gpu", "test_matches_reference"),
                         ("test_remask_step_gpu", "test_offsets_beyond_int32")]:
        for backend in ("triton", "cuda"):
            assert any(f"{module}.py::{test}[" in i and backend in i for i in ids), \
                (module, test, backend)
    assert any("test_every_device_draws_the_same_noise" in i for i in ids)
    # every attention mask kind meets every head dimension of each backend, in both dtypes
    from llada_kernels.ops.attention import SUPPORTED

    attention = [i for i in ids if "test_attention_gpu.py::test_matches_reference[" in i]
    for backend in ("triton", "cuda"):
        dtypes, dims = SUPPORTED[backend]
        for dtype in dtypes:
            for D in dims:
                kinds = {i.split("-")[3] for i in attention
                         if f"[{backend}-{str(dtype)[6:]}-d{D}-" in i}
                assert len(kinds) >= 6, (backend, dtype, D, kinds)


PLANTED = '''
import time

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "planted"

def test_zz_hangs():
    time.sleep(600)
'''


def test_dry_run_reports_a_failure_and_a_hang_and_goes_on(tmp_path):
    tests = tmp_path / "planted"
    tests.mkdir()
    (tests / "test_planted.py").write_text(PLANTED)
    (tests / "bench_planted.py").write_text("def test_bench():\n    pass\n")
    proc, summary, _ = run_dry(tmp_path, GPU_CHECK_TESTS=str(tests), GPU_CHECK_TESTS_S="25",
                               GPU_CHECK_BENCHMARKS=str(tests))
    assert proc.returncode == 1
    assert not summary["ok"]
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["tests"]["timed_out"] and stages["tests"]["rc"] == 124
    assert stages["bench-collect"]["rc"] == 0  # the stage after the hang still ran
    outcome = {r["nodeid"].split("::")[-1]: r["outcome"] for r in summary["tests"]["results"]}
    assert outcome == {"test_passes": "passed", "test_fails": "failed"}
    assert "planted" in summary["tests"]["failures"][0]["message"]
    assert "FAILED" in proc.stdout or "FAIL " in proc.stdout


def test_report_counts_worst_outcomes_and_keeps_gpu_rows(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "stages.tsv").write_text("env\t0\t1\t30\nbuild\t0\t90\t200\ntests\t1\t50\t170\n"
                                     "bench-remask_step\t124\t60\t60\n")
    lines = [{"nodeid": "a::ok", "outcome": "passed"}, {"nodeid": "a::bad", "outcome": "failed"},
             {"nodeid": "a::skip", "outcome": "skipped"},
             {"nodeid": "a::teardown", "outcome": "passed"},
             {"nodeid": "a::teardown", "outcome": "error", "when": "teardown"}]
    (work / "tests.jsonl").write_text("".join(
        json.dumps({"when": "call", "seconds": 0.1, "message": "m", **r}) + "\n" for r in lines))
    (work / "results.csv").write_text("op,provider,device,median_ms\nx,triton,cuda,1.5\n"
                                      "x,cpu,cpu,9.0\n")
    assert report.main(str(work), str(out)) == 1
    s = json.loads((out / "summary.json").read_text())
    assert (s["tests"]["passed"], s["tests"]["failed"], s["tests"]["error"],
            s["tests"]["skipped"]) == (1, 1, 1, 1)
    assert [st["timed_out"] for st in s["stages"]] == [False, False, False, True]
    assert s["benchmarks"]["rows"] == 1
    assert (out / "gpu-results.csv").read_text().splitlines() == [
        "op,provider,device,median_ms", "x,triton,cuda,1.5"]


@pytest.mark.parametrize("stages, tests, ok", [
    ("env\t0\t1\t30\n", [], True),
    ("env\t0\t1\t30\nbuild\t2\t5\t200\n", [], False),          # a stage failed
    ("env\t0\t1\t30\n", [{"nodeid": "t", "outcome": "failed"}], False),
])
def test_report_ok_needs_every_stage_and_test(tmp_path, stages, tests, ok):
    (tmp_path / "stages.tsv").write_text(stages)
    (tmp_path / "tests.jsonl").write_text("".join(
        json.dumps({"when": "call", "seconds": 0, "message": "", **r}) + "\n" for r in tests))
    assert report.main(str(tmp_path), str(tmp_path)) == (0 if ok else 1)


# ---- the GPU tests' accuracy check catches bugs (run here on the C++ CPU kernel) -------------

class _GradTimes(torch.autograd.Function):
    """Identity forward; the gradient times `factor` (a planted backward bug)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _drops_last_key(real):
    def attention(q, k, v, key_padding_mask=None, **kw):  # an off-by-one tile bound
        keep = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool) if key_padding_mask is None \
            else key_padding_mask.clone()
        keep[:, -1] = False
        return real(q, k, v, key_padding_mask=keep, **kw)
    return attention


def _wrong_dk(real):
    def attention(q, k, v, **kw):
        return real(q, _GradTimes.apply(k, 1.02), v, **kw)
    return attention


@pytest.fixture
def attention_gpu_on_cpu(monkeypatch):
    import gpu_common
    import test_attention_gpu

    monkeypatch.setattr(gpu_common, "DEVICE", torch.device("cpu"))
    return test_attention_gpu


def test_attention_check_passes_a_correct_kernel(attention_gpu_on_cpu):
    for mask in attention_gpu_on_cpu.MASKS:
        attention_gpu_on_cpu.check("cpu", (2, 4, 2, 33, 70), 64, torch.bfloat16, mask)


@pytest.mark.parametrize("plant", [_drops_last_key, _wrong_dk], ids=["drops_last_key", "wrong_dk"])
def test_attention_check_fails_a_planted_bug(attention_gpu_on_cpu, monkeypatch, plant):
    t = attention_gpu_on_cpu
    real = t.ATTENTION

    def planted(q, k, v, backend=None, **kw):
        fn = plant(real) if backend == "cpu" else real
        return fn(q, k, v, backend=backend, **kw)

    monkeypatch.setattr(t, "ATTENTION", planted)
    with pytest.raises(AssertionError, match="error .* > 2 x eager"):
        t.check("cpu", (2, 4, 2, 33, 70), 64, torch.bfloat16, "some")
