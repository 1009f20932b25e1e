"""Ahead-of-time compilation of the Triton kernels, to inspect their machine code without a GPU.

Every module in llada_kernels/triton/ lists the launch configurations its host launcher uses as

    AOT_SPECS = [AotSpec(name, fn, signature, constexprs, num_warps, num_stages), ...]

and compile_spec() compiles one of them for a compute capability with Triton's own pipeline
(no GPU or driver is needed), then runs `ptxas -v` on the PTX to read the register count and
spills. tests/test_triton_aot.py fails on any spill or compile error, for sm_80 and sm_90.

From a shell:

    python -m llada_kernels.triton._aot                 # a table, sm_80 and sm_90
    python -m llada_kernels.triton._aot --arch 90 --json

A kernel decorated while TRITON_INTERPRET=1 is an interpreter object that cannot be compiled;
run this in a process without that variable (the test does: it runs this module in a
subprocess with the variable removed).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

CAPABILITIES = (80, 90)


@dataclass(frozen=True)
class AotSpec:
    """One launch configuration of a @triton.jit kernel.

    signature: every runtime parameter -> its Triton type, as the JIT would infer it at the
        launch ("*bf16" for a bf16 tensor, "*u1" for bool, "i64", "fp32"). Parameters that are
        tl.constexpr go in `constexprs` instead, with the value the launcher passes.
    divisible_by_16: parameters the JIT would see as multiples of 16 (pointers: 16-byte
        aligned). None means every pointer parameter, the case of freshly allocated tensors.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] | None = None


@dataclass(frozen=True)
class AotInfo:
    """What ptxas reports for one spec on one compute capability."""

    name: str
    capability: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes
    shared_memory: int  # bytes, static and dynamic
    mma: bool  # the PTX holds mma.sync (tensor cores, sm_80 style)
    wgmma: bool  # the PTX holds wgmma (sm_90 warpgroup tensor cores)
    seconds: float  # Triton compile plus ptxas

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def compile_spec(spec: AotSpec, capability: int) -> AotInfo:
    """Compile `spec` for sm_<capability> and report registers, spills and tensor-core use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec.fn
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{spec.name}: {type(fn).__name__} is not a JITFunction; was it decorated "
                        "under TRITON_INTERPRET=1? Compile in a process without that variable.")
    params = list(fn.arg_names)
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(params)
    missing = [p for p in params if p not in spec.signature and p not in spec.constexprs]
    if unknown or missing:
        raise ValueError(f"{spec.name}: signature and constexprs must name each parameter of "
                         f"{fn.__name__} once; unknown {sorted(unknown)}, missing {missing}")
    signature = {p: spec.signature.get(p, "constexpr") for p in params}
    aligned = spec.divisible_by_16
    if aligned is None:
        aligned = tuple(p for p, t in spec.signature.items() if t.startswith("*"))
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in aligned}

    start = time.perf_counter()
    kernel = triton.compile(
        ASTSource(fn, signature, dict(spec.constexprs), attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    ptx = kernel.asm["ptx"]
    usage = _cached_ptxas_usage(kernel.hash, ptx, capability)
    return AotInfo(
        name=spec.name, capability=capability, **usage,
        shared_memory=int(kernel.metadata.shared),
        mma=re.search(r"(?<![\w.])mma\.", ptx) is not None,
        wgmma="wgmma." in ptx,
        seconds=round(time.perf_counter() - start, 2),
    )


def ptxas_path() -> str:
    """The ptxas that assembles Triton's kernels at run time (Triton's bundled copy, or
    TRITON_PTXAS_PATH), so the counts describe the code that runs; else the CUDA toolkit's,
    found beside the real nvcc (nvcc on PATH may be a wrapper script)."""
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001  (older Triton, or no NVIDIA backend)
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        try:  # a wrapper that execs the real compiler: ask nvcc where it lives
            out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            top = re.search(r"^#\$ TOP=(.*)$", out.stderr + out.stdout, re.M)
            if top:
                real = os.path.join(top.group(1).strip(), "bin", "nvcc")
        except (OSError, subprocess.SubprocessError):
            pass
        candidate = os.path.join(os.path.dirname(real), "ptxas")
        if os.path.exists(candidate):
            return candidate
    found = shutil.which("ptxas")
    if found:
        return found
    raise FileNotFoundError("no ptxas: install Triton's NVIDIA backend or the CUDA toolkit")


def _cached_ptxas_usage(kernel_hash: str, ptx: str, capability: int) -> dict[str, int]:
    """_ptxas_usage, kept beside the compiled kernel in Triton's cache: a warm run of the test
    then costs a cache lookup per spec instead of a ptxas run."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(kernel_hash)
    name = "llada_ptxas_usage.json"
    path = cache.get_file(name)
    if path is not None:
        with open(path) as f:
            return json.load(f)
    usage = _ptxas_usage(ptx, capability)
    cache.put(json.dumps(usage), name, binary=False)
    return usage


def _ptxas_usage(ptx: str, capability: int) -> dict[str, int]:
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # The flags Triton itself passes (backends/nvidia/compiler.py, make_cubin).
        cmd = [ptxas_path(), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed ({' '.join(cmd)}):\n{log}")

    def number(pattern):
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"unexpected ptxas -v output, no {pattern!r}:\n{log}")
        return int(m.group(1))

    return dict(registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"),
                stack_frame=number(r"(\d+) bytes stack frame"))


def collect_specs() -> list[AotSpec]:
    """AOT_SPECS of every module in llada_kernels.triton (modules without it are skipped)."""
    from llada_kernels import triton as package

    specs = []
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if module == "_aot":
            continue
        specs += getattr(importlib.import_module(f"{package.__name__}.{module}"), "AOT_SPECS", [])
    return specs


def compile_all(capabilities=CAPABILITIES, names=None) -> list[dict]:
    """compile_spec over specs x capabilities, as JSON-ready dicts; a failure becomes
    {"name", "capability", "error"} instead of stopping the rest."""
    results = []
    for spec in collect_specs():
        if names is not None and spec.name not in names:
            continue
        for cap in capabilities:
            try:
                info = compile_spec(spec, cap)
                results.append(dataclasses.asdict(info) | {"spills": info.spills})
            except Exception as e:  # noqa: BLE001  (reported per spec)
                results.append({"name": spec.name, "capability": cap,
                                "error": f"{type(e).__name__}: {e}"})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(CAPABILITIES),
                        help="compute capabilities, e.g. 80 90")
    parser.add_argument("--name", nargs="+", help="only these specs")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, args.name)
    if args.json:
        json.dump(results, sys.stdout)
        return
    print(f"{'spec':44} {'sm':>3} {'regs':>5} {'spill B':>8} {'smem B':>7} {'mma':>5} {'s':>5}")
    for r in results:
        if "error" in r:
            print(f"{r['name']:44} {r['capability']:>3} ERROR {r['error']}")
            continue
        tc = "wgmma" if r["wgmma"] else "mma" if r["mma"] else "-"
        print(f"{r['name']:44} {r['capability']:>3} {r['registers']:>5} {r['spills']:>8} "
              f"{r['shared_memory']:>7} {tc:>5} {r['seconds']:>5}")


if __name__ == "__main__":
    main()
