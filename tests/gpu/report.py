"""The report of tests/gpu/run.sh: summary.json (and gpu-results.csv) from what the stages left.

    python3 tests/gpu/report.py WORK_DIR OUT_DIR

reads, in WORK_DIR (every file optional: a stage that died leaves what it had written):
    stages.tsv      name, exit code, seconds, time box (s): one line per stage run.sh ran
    env.json        the machine and the software versions
    tests.jsonl     one JSON line per test outcome (tests/gpu/gpu_progress.py)
    results.csv     the benchmark suite's CSV (benchmarks/run.py)
and writes, in OUT_DIR,
    summary.json    {"ok", "machine", "stages", "tests": counts, per-test results, failures,
                     "benchmarks": the GPU rows}
    gpu-results.csv the benchmark rows measured on the GPU (device == "cuda")
then prints a short summary. Exit status 0 when every stage exited 0 and no test failed.
Standard library only: it runs on the GPU machine's python3 as it is.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}  # a test's worst outcome counts


def read_stages(path: Path) -> list[dict]:
    stages = []
    if path.exists():
        for line in path.read_text().splitlines():
            name, rc, seconds, limit = line.split("\t")
            rc = int(rc)
            stages.append({"name": name, "rc": rc, "seconds": int(seconds), "limit_s": int(limit),
                           "timed_out": rc in (124, 137)})
    return stages


def read_tests(path: Path) -> dict:
    worst: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            old = worst.get(r["nodeid"])
            if old is None or RANK[r["outcome"]] > RANK[old["outcome"]]:
                worst[r["nodeid"]] = r
    counts = {k: 0 for k in RANK}
    for r in worst.values():
        counts[r["outcome"]] += 1
    return {**counts, "total": len(worst),
            "results": [{"nodeid": r["nodeid"], "outcome": r["outcome"], "seconds": r["seconds"]}
                        for r in worst.values()],
            "failures": [{"nodeid": r["nodeid"], "outcome": r["outcome"], "message": r["message"]}
                         for r in worst.values() if r["outcome"] in ("failed", "error")]}


def read_benchmarks(path: Path, out_csv: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("device") == "cuda"]
        fields = reader.fieldnames or []
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(work_dir: str, out_dir: str) -> int:
    work, out = Path(work_dir), Path(out_dir)
    env_path = work / "env.json"
    summary = {
        "machine": json.loads(env_path.read_text()) if env_path.exists() else {},
        "stages": read_stages(work / "stages.tsv"),
        "tests": read_tests(work / "tests.jsonl"),
    }
    rows = read_benchmarks(work / "results.csv", out / "gpu-results.csv")
    summary["benchmarks"] = {"rows": len(rows), "csv": "gpu-results.csv" if rows else None,
                             "results": rows}
    t = summary["tests"]
    summary["ok"] = (all(s["rc"] == 0 for s in summary["stages"]) and t["failed"] == 0
                     and t["error"] == 0)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    print(f"== GPU check: {'PASS' if summary['ok'] else 'FAIL'}  ({out / 'summary.json'})")
    for s in summary["stages"]:
        state = "timed out" if s["timed_out"] else "ok" if s["rc"] == 0 else f"exit {s['rc']}"
        print(f"   stage {s['name']:<28} {state:<10} {s['seconds']:>4} s (box {s['limit_s']} s)")
    print(f"   tests: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
          f"{t['skipped']} skipped")
    for f in t["failures"]:
        print(f"   {f['outcome'].upper()} {f['nodeid']}")
    print(f"   benchmarks: {len(rows)} GPU rows" + (" -> gpu-results.csv" if rows else ""))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
