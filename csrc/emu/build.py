"""Build the CUDA kernels of csrc/cuda for the host emulation (csrc/emu/include/llada_emu/cuda_emu.h).

    python csrc/emu/build.py            # builds build/cuda_emu/libllada_cuda_emu.so, prints its path

The library registers the `llada_emu` operator namespace: every schema of csrc/ops.cpp, with the
kernels of the .cu files in csrc/SOURCES on the CPU dispatch key, plus the emulation's controls
(llada_emu::_set_schedule, _plant, _stats) and the layer's own test kernels
(llada_emu_test::*, csrc/emu/selftest.cu). tests/cuda_emu.py builds and loads it once per test
session; ninja rebuilds only what changed.

Each source is rewritten into build/cuda_emu/src/ with its line numbers kept (a `#line`
directive maps __FILE__ and the debug info back to csrc/):
  - the emulation's prelude is included first (.cu files);
  - `kernel<<<grid, block, smem, stream>>>(args)` becomes
    `kernel | ::llada_emu::config("kernel", grid, block, smem, stream)(args)`;
  - `__shared__ T a[N], b;` becomes `auto& a = ::llada_emu::static_shared<T[N], align>([] {});`
    and so on (one slot per declaration in the block's shared-memory arena), and
    `extern __shared__ T s[];` a reference to the block's dynamic shared memory;
  - `TORCH_LIBRARY_IMPL(llada, CUDA, m)` becomes `TORCH_LIBRARY_IMPL(llada_emu, CPU, m)`,
    `TORCH_LIBRARY(llada, m)` becomes `TORCH_LIBRARY(llada_emu, m)`, and `is_cuda()` is
    `is_cpu()`: the emulated kernels take CPU tensors.
Comments and string literals are left alone. Nothing else changes: a construct the rewriter or
the prelude does not know fails to compile rather than running differently.

Kernel code is compiled with g++ -fsanitize=thread's instrumentation, whose memory-access
hooks csrc/emu/memory.cpp implements (the hazard checker; ThreadSanitizer's own runtime is not
linked), -ffp-contract=off (no fma that the source did not write) and -fno-strict-aliasing (the
kernels type-pun as CUDA allows).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "csrc" / "emu"
LIB_NAME = "libllada_cuda_emu.so"


# ---- the rewriter -----------------------------------------------------------------------------

def code_mask(text: str) -> str:
    """text with comments and the insides of string and character literals blanked out (same
    length, newlines kept), so that patterns match code only."""
    out = list(text)
    i, n = 0, len(text)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif text[i] == "R" and text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'R"([^(\s]*)\(', text[i:])
            end = text.find(")" + m.group(1) + '"', i) if m else -1
            j = n if end < 0 else end + len(m.group(1)) + 2
            blank(i + 1, j)
            i = j
        elif text[i] in "\"'":
            q, j = text[i], i + 1
            while j < n and text[j] != q:
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, j)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


_DECLARATOR = re.compile(r"^(?P<ptr>[\s*&]*)(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$")
_ALIGN = re.compile(r"__align__\s*\(\s*(\w+)\s*\)|alignas\s*\(\s*(\w+)\s*\)")


def _shared(decl: str, where: str) -> str:
    """One `__shared__ ...;` declaration (without the keyword and the semicolon) as slots."""
    align = "0"
    m = _ALIGN.search(decl)
    if m:
        align = m.group(1) or m.group(2)
        decl = decl[:m.start()] + decl[m.end():]
    parts = _split_top_level(decl.strip())
    first = re.match(r"^(?P<type>.*?[\w>:])\s*(?P<decl>[\s*&]*[A-Za-z_]\w*\s*(?:\[[^\]]*\]\s*)*)$", parts[0].strip(), re.S)
    if not first or "=" in decl:
        raise ValueError(f"{where}: cannot rewrite the __shared__ declaration {decl!r}")
    base = " ".join(first.group("type").split())
    out = []
    for d in [first.group("decl")] + parts[1:]:
        m = _DECLARATOR.match(d.strip())
        if not m:
            raise ValueError(f"{where}: cannot rewrite the __shared__ declarator {d!r}")
        ptr, dims = m.group("ptr").replace(" ", ""), re.sub(r"\s+", "", m.group("dims"))
        out.append(f"auto& {m.group('name')} = ::llada_emu::static_shared<{base}{ptr}{dims}, {align}>([] {{}});")
    return " ".join(out)


def _kernel_text(text: str, end: int) -> str:
    """The kernel expression that ends at `end` (before `<<<`), for messages."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    stop = i
    while i > 0:
        c = text[i - 1]
        if c == ">":  # template arguments
            depth, j = 0, i - 1
            while j >= 0:
                depth += {">": 1, "<": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j -= 1
            i = j
        elif c.isalnum() or c == "_" or c == ":" or c == ".":
            i -= 1
        else:
            break
    return " ".join(text[i:stop].split()) or "kernel"


def rewrite(text: str, name: str) -> str:
    """The emulation build's version of one source file (see the module docstring)."""
    edits = []  # (start, end, replacement), on the original text
    mask = code_mask(text)

    def keep_lines(original, replacement):
        return replacement + "\n" * (original.count("\n") - replacement.count("\n"))

    for m in re.finditer(r"\bextern\s+__shared__\b(?P<decl>[^;]*);", mask):
        decl = _ALIGN.sub("", text[m.start("decl"):m.end("decl")]).strip()
        d = re.match(r"^(?P<type>.*?[\w>:])\s*(?P<name>[A-Za-z_]\w*)\s*\[\s*\]$", decl, re.S)
        if not d:
            raise ValueError(f"{name}: cannot rewrite the dynamic shared declaration {decl!r}")
        t = " ".join(d.group("type").split())
        edits.append((m.start(), m.end(), keep_lines(
            text[m.start():m.end()],
            f"{t} (&{d.group('name')})[] = *reinterpret_cast<{t} (*)[]>(::llada_emu::dynamic_shared());")))
    dynamic = {e[0] for e in edits}
    for m in re.finditer(r"\b__shared__\b(?P<decl>[^;]*);", mask):
        if any(s <= m.start() < e for s, e, _ in edits if s in dynamic):
            continue
        line = text.count("\n", 0, m.start()) + 1
        edits.append((m.start(), m.end(), keep_lines(
            text[m.start():m.end()], _shared(text[m.start("decl"):m.end("decl")], f"{name}:{line}"))))
    for m in re.finditer(r"<<<(?P<cfg>.*?)>>>", mask, re.S):
        kernel = _kernel_text(text, m.start()).replace("\\", "\\\\").replace('"', '\\"')
        cfg = text[m.start("cfg"):m.end("cfg")]
        edits.append((m.start(), m.end(), f' | ::llada_emu::config("{kernel}", {cfg})'))
    for pattern, repl in ((r"\bTORCH_LIBRARY_IMPL\(\s*llada\s*,\s*CUDA\s*,", "TORCH_LIBRARY_IMPL(llada_emu, CPU,"),
                          (r"\bTORCH_LIBRARY\(\s*llada\s*,", "TORCH_LIBRARY(llada_emu,"),
                          (r"\bTORCH_LIBRARY_FRAGMENT\(\s*llada\s*,", "TORCH_LIBRARY_FRAGMENT(llada_emu,"),
                          (r"\bis_cuda\(\)", "is_cpu()")):
        edits += [(m.start(), m.end(), repl) for m in re.finditer(pattern, mask)]
    for start, end, repl in sorted(edits, reverse=True):
        text = text[:start] + repl + text[end:]
    prelude = '#include "llada_emu/cuda_emu.h"\n' if name.endswith(".cu") else ""
    return f'{prelude}#line 1 "{name}"\n{text}'


# ---- the build ----------------------------------------------------------------------------------

def _sources() -> list[str]:
    lines = (ROOT / "csrc" / "SOURCES").read_text().splitlines()
    return [s.strip() for s in lines if s.strip().endswith(".cu") and not s.lstrip().startswith("#")]


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _ninja() -> str:
    for cand in (Path(sys.executable).parent / "ninja", shutil.which("ninja")):
        if cand and Path(cand).exists():
            return str(cand)
    try:
        import ninja  # noqa: PLC0415
        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        raise RuntimeError("csrc/emu/build.py needs ninja (pip install ninja)") from None


def build(build_dir: Path | None = None, jobs: int | None = None, verbose: bool = False) -> Path:
    """Generate the rewritten sources and build the library; returns its path."""
    import torch
    from torch.utils import cpp_extension

    out = Path(build_dir or ROOT / "build" / "cuda_emu")
    src = out / "src"
    units = []  # (generated source, instrumented)
    # ops.cpp (the schemas) and isa.cpp (the cpu_capability ops that ops.cpp defines) hold no
    # kernel code
    for rel in ["csrc/ops.cpp", "csrc/isa.cpp"] + _sources() + ["csrc/emu/selftest.cu"]:
        path = src / rel
        _write_if_changed(path, rewrite((ROOT / rel).read_text(), rel))
        units.append((path, rel.endswith(".cu")))
    for header in ([ROOT / "csrc" / "isa.h"] + sorted((ROOT / "csrc").glob("cuda/*.cuh"))
                   + sorted((ROOT / "csrc").glob("common/*.h"))):
        rel = str(header.relative_to(ROOT))
        _write_if_changed(src / rel, rewrite(header.read_text(), rel))
    units += [(EMU / "threads.cpp", False), (EMU / "memory.cpp", False)]

    includes = [f"-I{EMU / 'include'}", f"-I{src / 'csrc'}"] + [f"-isystem {p}" for p in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    common = (f"-std=c++20 -O2 -g1 -fPIC -fno-strict-aliasing -ffp-contract=off "
              f"-DLLADA_CUDA_EMU {abi} {' '.join(includes)}")
    lib_dirs = cpp_extension.library_paths()
    ldflags = " ".join(f"-L{d} -Wl,-rpath,{d}" for d in lib_dirs) + " -lc10 -ltorch_cpu"
    rules = [
        f"cxx = {os.environ.get('CXX', 'g++')}",
        f"common = {common}",
        "rule cc_kernel",
        "  command = $cxx $common -fsanitize=thread --param=tsan-instrument-func-entry-exit=0 "
        "-x c++ -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX (emulated CUDA) $in",
        "rule cc_runtime",
        "  command = $cxx $common -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "rule link",
        f"  command = $cxx -shared -o $out $in {ldflags}",
        "  description = LINK $out",
    ]
    objects = []
    for path, instrumented in units:
        obj = out / "obj" / (str(path.relative_to(src if path.is_relative_to(src) else ROOT)).replace("/", "_") + ".o")
        objects.append(str(obj))
        rules.append(f"build {obj}: {'cc_kernel' if instrumented else 'cc_runtime'} {path}")
    lib = out / LIB_NAME
    rules.append(f"build {lib}: link {' '.join(objects)}")
    _write_if_changed(out / "build.ninja", "\n".join(rules) + "\n")
    (out / "obj").mkdir(parents=True, exist_ok=True)
    jobs = jobs or int(os.environ.get("MAX_JOBS", 0)) or os.cpu_count() or 1
    proc = subprocess.run([_ninja(), "-C", str(out), "-j", str(jobs)], capture_output=not verbose, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the CUDA host emulation failed:\n{(proc.stdout or '')[-6000:]}")
    return lib


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
