"""The benchmark suite: run every benchmarks/bench_*.py with pytest-benchmark, then write one
CSV (benchmarks/results/results.csv), a markdown table and a plot per op.

    python benchmarks/run.py                 # everything
    python benchmarks/run.py -k remask       # extra arguments go to pytest; rows of shapes
                                             # not run are kept from the last CSV

Columns: op, provider, shape, dtype, device, median/p20/p80 in ms, GB/s (over the bytes the
benchmark names, e.g. the logits), TFLOP/s (where it names flops), peak extra memory in MB,
speedup over the "eager" provider of the same row group, and the machine.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COLUMNS = ["op", "provider", "shape", "dtype", "device", "median_ms", "p20_ms", "p80_ms",
           "gb_per_s", "tflop_per_s", "peak_extra_mb", "speedup_vs_eager", "machine"]


def quantile(data, q):
    data = sorted(data)
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def rows_from(report):
    rows = []
    for bench in report["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        data = stats.get("data") or [stats["median"]]
        median = stats["median"]
        row = {k: info.get(k) for k in ("op", "provider", "shape", "dtype", "device", "machine")}
        row.update(median_ms=median * 1e3, p20_ms=quantile(data, 0.2) * 1e3,
                   p80_ms=quantile(data, 0.8) * 1e3)
        row["gb_per_s"] = info["bytes"] / median / 1e9 if info.get("bytes") else None
        row["tflop_per_s"] = info["flops"] / median / 1e12 if info.get("flops") else None
        peak = info.get("peak_extra_bytes")
        row["peak_extra_mb"] = peak / 2**20 if peak is not None else None
        rows.append(row)
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["device"])  # noqa: E731
    eager = {key(r): r["median_ms"] for r in rows if r["provider"] == "eager"}
    for r in rows:
        r["speedup_vs_eager"] = eager[key(r)] / r["median_ms"] if key(r) in eager else None
    return sorted(rows, key=lambda r: (key(r), r["provider"] != "eager", r["provider"]))


def merge(rows, path):
    """The new rows, plus the rows of an earlier CSV whose group (op, shape, dtype, device:
    every provider of one measurement) this run did not measure, so that `run.py -k <op>` or
    `-k "<op> and 512"` refreshes those numbers and keeps the others. Ratios are never mixed
    across runs: a group is replaced whole."""
    if not path.exists():
        return rows
    group = lambda r: (r["op"], r["shape"], r["dtype"], r["device"])  # noqa: E731
    measured = {group(r) for r in rows}
    with open(path, newline="") as f:
        old = [r for r in csv.DictReader(f) if group(r) not in measured]
    for r in old:
        for c in COLUMNS[5:-1]:
            r[c] = float(r[c]) if r[c] else None
    return rows + old


def fmt(v):
    if v is None:
        return ""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: fmt(r[c]) for c in COLUMNS})


def markdown(rows):
    cols = ["op", "provider", "shape", "dtype", "device", "median_ms", "gb_per_s",
            "peak_extra_mb", "speedup_vs_eager"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    for op in sorted({r["op"] for r in rows}):
        sel = [r for r in rows if r["op"] == op and r["provider"] != "eager" and r["speedup_vs_eager"]]
        if not sel:
            continue
        groups = sorted({(r["device"], r["shape"], r["dtype"]) for r in sel})
        provs = sorted({r["provider"] for r in sel})
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 4))
        width = 0.8 / len(provs)
        for i, p in enumerate(provs):
            ys = [next((r["speedup_vs_eager"] for r in sel if r["provider"] == p and
                        (r["device"], r["shape"], r["dtype"]) == g), 0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], ys, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{d}\n{s}\n{t}" for d, s, t in groups], fontsize=7)
        ax.set_ylabel("speedup over eager")
        ax.set_title(op)
        ax.legend()
        fig.tight_layout()
        name = "".join(c if c.isalnum() else "_" for c in op).strip("_")
        fig.savefig(RESULTS / f"{name}.png", dpi=120)
        plt.close(fig)


def main(argv):
    RESULTS.mkdir(exist_ok=True)
    raw = RESULTS / "raw.json"
    code = pytest.main([str(HERE), "-o", "python_files=bench_*.py", "-p", "no:cacheprovider",
                        "--benchmark-enable", "--benchmark-only", f"--benchmark-json={raw}",
                        "--benchmark-save-data", "-q", *argv])
    if not raw.exists():
        return code or 1  # nothing ran; a failed benchmark still leaves its siblings' rows
    rows = merge(rows_from(json.loads(raw.read_text())), RESULTS / "results.csv")
    write_csv(rows, RESULTS / "results.csv")
    plot(rows)
    table = markdown(rows)
    (RESULTS / "results.md").write_text(table + "\n")
    print(table)
    return 0 if code == 5 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
