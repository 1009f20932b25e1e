#!/usr/bin/env bash
# The GPU check: one command, on a machine with an NVIDIA GPU as that machine is. It uses the
# machine's own python3 with its torch and Triton and the nvcc on PATH: no venv, no package
# index, nothing downloaded.
#
#   tests/gpu/run.sh             build against this torch for this GPU only, run tests/gpu,
#                                then the benchmark suite on CUDA tensors
#   tests/gpu/run.sh --dry-run   everything that needs no GPU (CI runs it): the environment,
#                                the build command (printed, not run), every test of tests/gpu
#                                collected and skipped, the benchmarks collected, the report
#
# Stages, each in its own time box (seconds, overridable), all inside GPU_CHECK_TOTAL_S=450:
#   env        versions, GPU and CPU -> summary.json's "machine"        GPU_CHECK_ENV_S=30
#   build      setup.py build_ext --inplace for this GPU's arch only (LLADA_CUDA_ARCHS, if
#              set, instead)                                             GPU_CHECK_BUILD_S=200
#   tests      pytest tests/gpu, in parallel where pytest-xdist is installed (the big-memory
#              tests on one worker), 120 s a test where pytest-timeout is   GPU_CHECK_TESTS_S=170
#   contract   the non-finite contract's table on CUDA tensors (tests/test_contract.py, its
#              cuda-reference, cuda-triton and cuda-cuda rows)               GPU_CHECK_CONTRACT_S=60
#   bench-*    benchmarks/run.py on CUDA tensors, one op per stage       GPU_CHECK_BENCH_S=60
# A failed or timed-out stage does not stop the next ones: the benchmarks run whatever the
# tests did. Only a failed build stops the GPU stages (there is nothing to run). A stage that
# would pass the total box is cut to what is left of it (or not run).
#
# Output in $OUT (default build/gpu-check/out): summary.json (stages, per-test results, the
# GPU benchmark rows, the machine), tests.xml and contract.xml (junit), gpu-results.csv, run.log (everything
# printed), build.log. Exit status 0 when every stage passed and no test failed.
# Variables: PYTHON (python3), GPU_CHECK_TESTS (the tests to run, default tests/gpu),
# GPU_CHECK_BENCH_FILTER (extra pytest -k for the benchmarks), GPU_CHECK_WORKERS (pytest-xdist
# workers, 6), GPU_CHECK_BENCHMARKS (what --dry-run collects), the time boxes above.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/build/gpu-check/out}
WORK=$(mktemp -d)  # what the stages leave for report.py
trap 'rm -rf "$WORK"' EXIT
TESTS=${GPU_CHECK_TESTS:-tests/gpu}
BENCHMARKS=${GPU_CHECK_BENCHMARKS:-benchmarks}  # what --dry-run collects
mkdir -p "$OUT"
rm -f "$OUT"/summary.json "$OUT"/tests.xml "$OUT"/contract.xml "$OUT"/gpu-results.csv "$OUT"/build.log
exec > >(tee "$OUT/run.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT/tests/gpu${PYTHONPATH:+:$PYTHONPATH}"
if [ $DRY = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # a dry run touches no GPU, even where there is one
fi
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_TOTAL_S:-450}))

# stage NAME BOX CMD...: run CMD in a time box (cut to what is left of the total), record
# "name rc seconds box" in stages.tsv. Returns CMD's status (124 when the box ran out).
stage() {
  local name=$1 box=$2 left rc t0
  shift 2
  left=$((DEADLINE - $(date +%s)))
  [ "$left" -lt "$box" ] && box=$left
  if [ "$box" -lt 5 ]; then
    echo "== $name: not run, the total time box is spent"
    printf '%s\t124\t0\t%s\n' "$name" "$box" >> "$WORK/stages.tsv"
    return 124
  fi
  echo "== $name (box ${box} s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$box" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$box" >> "$WORK/stages.tsv"
  echo "== $name: exit $rc after $(($(date +%s) - t0)) s"
  return $rc
}

env_report() {
  "$PY" - "$WORK/env.json" <<'EOF'
import json, os, platform, shutil, subprocess, sys
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
info = {"python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "cpus": os.cpu_count()}
cpu = run("lscpu") or ""
info["cpu"] = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), platform.processor())
flags = next((l.split(":", 1)[1].split() for l in cpu.splitlines() if l.startswith("Flags")), [])
info["cpu_isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
nvcc = run("nvcc", "--version")
info["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
try:
    import torch
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["capability"] = "%d.%d" % (p.major, p.minor)
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["multiprocessors"] = p.multi_processor_count
except Exception as e:  # noqa: BLE001
    info["torch_error"] = repr(e)
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:  # noqa: BLE001
    info["triton_error"] = repr(e)
info["nvidia_smi"] = run("nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,memory.total", "--format=csv,noheader")
for plugin in ("pytest_timeout", "flash_attn", "liger_kernel", "cut_cross_entropy"):
    info[plugin] = __import__("importlib").util.find_spec(plugin) is not None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
}

export -f env_report
export PY WORK OUT
stage env "${GPU_CHECK_ENV_S:-30}" bash -c env_report
TIMEOUT_ARGS=()
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
  TIMEOUT_ARGS=(-p pytest_timeout --timeout="${GPU_CHECK_TEST_TIMEOUT_S:-120}")
fi
XDIST_ARGS=()  # tests in parallel (Triton compiles on many cores), the big-memory ones on one worker
if [ $DRY = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST_ARGS=(-n "${GPU_CHECK_WORKERS:-6}" --dist loadgroup)
fi
TEST_CMD=("$PY" -m pytest "$TESTS" -p no:cacheprovider -p gpu_progress -q -rfE
          --gpu-progress="$WORK/tests.jsonl" --junitxml="$OUT/tests.xml" "${TIMEOUT_ARGS[@]}"
          "${XDIST_ARGS[@]}")

# The non-finite contract's table (tests/test_contract.py) on CUDA tensors: its cuda-* rows.
contract() {
  local per_test=""
  "$PY" -c "import pytest_timeout" 2>/dev/null && per_test="-p pytest_timeout --timeout=120"
  # shellcheck disable=SC2086
  "$PY" -m pytest tests/test_contract.py -k "cuda-reference or cuda-triton or cuda-cuda" \
    -p no:cacheprovider -p gpu_progress -q -rfE --gpu-progress="$WORK/tests.jsonl" \
    --junitxml="$OUT/contract.xml" $per_test
  local rc=$?
  if [ $DRY = 1 ] && [ $rc = 5 ]; then  # no CUDA tensors in a dry run: nothing selected
    echo "(dry run: the contract's CUDA rows are not collected without a GPU)"
    return 0
  fi
  return $rc
}
export -f contract
export DRY

if [ $DRY = 1 ]; then
  echo "== build (dry run, not run): LLADA_CUDA_ARCHS=<this GPU> MAX_JOBS=$(nproc) $PY setup.py build_ext --inplace"
  printf 'build\t0\t0\t0\n' >> "$WORK/stages.tsv"
  stage tests "${GPU_CHECK_TESTS_S:-170}" "${TEST_CMD[@]}"
  stage contract "${GPU_CHECK_CONTRACT_S:-60}" bash -c contract
  stage bench-collect "${GPU_CHECK_BENCH_S:-60}" "$PY" -m pytest "$BENCHMARKS" --collect-only -qq \
    -p no:cacheprovider -o "python_files=bench_*.py"
else
  build() {
    local arch
    arch=${LLADA_CUDA_ARCHS:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')} || {
      echo "no CUDA device visible to torch: nothing to build for"; return 2; }
    echo "building for $arch with $(nproc) jobs against torch $("$PY" -c 'import torch; print(torch.__version__)')"
    LLADA_CUDA_ARCHS=$arch MAX_JOBS=$(nproc) "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/build.log"
    [ $rc = 0 ] || return $rc
    "$PY" -c "import llada_kernels as lk, sys; b = lk.available_backends('remask_step', 'cuda'); print('backends on cuda:', b); sys.exit(0 if 'cuda' in b and 'triton' in b else 3)"
  }
  export -f build
  if stage build "${GPU_CHECK_BUILD_S:-200}" bash -c build; then
    stage tests "${GPU_CHECK_TESTS_S:-170}" "${TEST_CMD[@]}"
    stage contract "${GPU_CHECK_CONTRACT_S:-60}" bash -c contract
    rm -f benchmarks/results/raw.json
    BOX=${GPU_CHECK_BENCH_S:-60}
    # One op (or one part of attention) per stage: run.py writes its CSV when it ends, so a
    # stage cut by its box loses only its own rows. Attention in bf16 only (fp16 runs at the
    # same speed); its longest length, where FlexAttention also runs, on its own.
    for op in remask_step masked_diffusion_loss attention attention-4096 e2e; do
      case $op in
        e2e) sel="test_sampling or test_training_step" ;;
        attention) sel="bidirectional_attention and bfloat16 and not 4096" ;;
        attention-4096) sel="bidirectional_attention and bfloat16 and 4096" ;;
        *) sel=$op ;;
      esac
      stage "bench-$op" "$BOX" "$PY" benchmarks/run.py -k "cuda and ($sel)${GPU_CHECK_BENCH_FILTER:+ and ($GPU_CHECK_BENCH_FILTER)}"
    done
    cp benchmarks/results/results.csv "$WORK/results.csv" 2>/dev/null
  fi
fi

echo "== report after $(($(date +%s) - START)) s"
"$PY" tests/gpu/report.py "$WORK" "$OUT"
rc=$?
exec >&- 2>&-
wait "$TEE" 2>/dev/null
exit $rc
