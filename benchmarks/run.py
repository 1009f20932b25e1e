"""The benchmark suite: run every benchmarks/bench_*.py with pytest-benchmark, then write one
CSV (benchmarks/results/results.csv), a markdown table and a plot per op.

    python benchmarks/run.py                 # everything
    python benchmarks/run.py -k remask       # extra arguments go to pytest; rows of shapes
                                             # not run are kept from the last CSV
    python benchmarks/run.py --redraw        # the table and plots again from the CSV

Columns: op, provider, shape, dtype, device, median/p20/p80 in ms, GB/s (over the bytes the
benchmark names, e.g. the logits), TFLOP/s (where it names flops), peak extra memory in MB,
speedup over the "eager" and over the "sdpa" provider of the same row group, a note (e.g. how
many tiles a mask skips), the machine (CPU model, family/model, vector ISA, cores) and the
instruction sets the code ran with (llada's CPU kernels, ATen's).

A row group is one measurement: (op, shape, dtype, device, machine), every provider in it
measured in one run. Rows of other machines are kept, so results from two machines live side by
side in the CSV; the plots and the markdown table are per machine.
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
           "gb_per_s", "tflop_per_s", "peak_extra_mb", "speedup_vs_eager", "speedup_vs_sdpa",
           "note", "machine", "isa"]
NUMERIC = ["median_ms", "p20_ms", "p80_ms", "gb_per_s", "tflop_per_s", "peak_extra_mb",
           "speedup_vs_eager", "speedup_vs_sdpa"]


def group(r):
    """One measurement: every provider of (op, shape, dtype, device) on one machine."""
    return (r["op"], r["shape"], r["dtype"], r["device"], r["machine"])


def _default_isa():
    """The instruction sets of this process, for benchmarks that did not record them."""
    try:
        import torch
        import llada_kernels

        return f"llada {llada_kernels.cpu_capability()}, ATen {torch.backends.cpu.get_cpu_capability()}"
    except Exception:  # noqa: BLE001 - a row without it is still a row
        return ""


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
        row = {k: info.get(k) for k in ("op", "provider", "shape", "dtype", "device", "machine", "note")}
        row["isa"] = info.get("isa") if info.get("isa") is not None else (
            _default_isa() if row["device"] == "cpu" else "")
        row.update(median_ms=median * 1e3, p20_ms=quantile(data, 0.2) * 1e3,
                   p80_ms=quantile(data, 0.8) * 1e3)
        row["gb_per_s"] = info["bytes"] / median / 1e9 if info.get("bytes") else None
        row["tflop_per_s"] = info["flops"] / median / 1e12 if info.get("flops") else None
        peak = info.get("peak_extra_bytes")
        row["peak_extra_mb"] = peak / 2**20 if peak is not None else None
        rows.append(row)
    for base in ("eager", "sdpa"):
        times = {group(r): r["median_ms"] for r in rows if r["provider"] == base}
        for r in rows:
            r[f"speedup_vs_{base}"] = times[group(r)] / r["median_ms"] if group(r) in times else None
    return sorted(rows, key=order)


def order(r):
    return (r["machine"] or "", r["op"], r["shape"], r["dtype"], r["device"],
            r["provider"] not in ("eager", "sdpa"), r["provider"])


def merge(rows, path):
    """The new rows, plus the rows of an earlier CSV whose group (op, shape, dtype, device,
    machine: every provider of one measurement) this run did not measure, so that
    `run.py -k <op>` or `-k "<op> and 512"` refreshes those numbers and keeps the others, and
    another machine's rows stay. Ratios are never mixed across runs: a group is replaced whole."""
    if not path.exists():
        return rows
    measured = {group(r) for r in rows}
    with open(path, newline="") as f:
        old = [{c: r.get(c) or "" for c in COLUMNS} for r in csv.DictReader(f)]
    old = [r for r in old if group(r) not in measured]
    for r in old:
        for c in NUMERIC:
            r[c] = float(r[c]) if r[c] else None
    return sorted(rows + old, key=order)


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
    """One table per machine, under its name."""
    cols = ["op", "provider", "shape", "dtype", "device", "median_ms", "gb_per_s",
            "peak_extra_mb", "speedup_vs_eager", "speedup_vs_sdpa", "note", "isa"]
    out = []
    for m in sorted({r["machine"] or "" for r in rows}):
        out += [f"### {m or 'unknown machine'}", "", "| " + " | ".join(cols) + " |",
                "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows if (r["machine"] or "") == m]
        out.append("")
    return "\n".join(out)


def slug(text):
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def plot(rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    import textwrap

    for png in RESULTS.glob("*.png"):  # drawn again below from the whole CSV
        png.unlink()
    for op, mach in sorted({(r["op"], r["machine"] or "") for r in rows}):
        mine = [r for r in rows if r["op"] == op and (r["machine"] or "") == mach]
        base = "eager" if any(r["provider"] == "eager" for r in mine) else "sdpa"
        sel = [r for r in mine if r["provider"] != base and r[f"speedup_vs_{base}"]]
        if not sel:
            continue
        groups = sorted({(r["device"], r["shape"], r["dtype"]) for r in sel})
        provs = sorted({r["provider"] for r in sel})
        fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(groups) + 2), 5))
        width = 0.8 / len(provs)
        for i, p in enumerate(provs):
            ys = [next((r[f"speedup_vs_{base}"] for r in sel if r["provider"] == p and
                        (r["device"], r["shape"], r["dtype"]) == g), 0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], ys, width, label=p)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        # Labels wrapped to short lines and slanted, so that neighbours never run into each other.
        ax.set_xticklabels(["\n".join(textwrap.wrap(f"{s} {t} {d}", 16)) for d, s, t in groups],
                           fontsize=8, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_ylabel(f"speedup over {base} (same run)")
        ax.set_title(f"{op}\n{mach}", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{slug(op)}__{slug(mach)[:60]}.png", dpi=120)
        plt.close(fig)


def main(argv):
    RESULTS.mkdir(exist_ok=True)
    if argv == ["--redraw"]:  # the table and the plots again, from the CSV alone
        rows = merge([], RESULTS / "results.csv")
        code = 0
    else:
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
