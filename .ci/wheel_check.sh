#!/usr/bin/env bash
# CI: a wheel built from this tree (tools/build_wheel.sh: pip wheel, then auditwheel repair to
# a manylinux tag) installs into a clean venv and passes tests/wheel_smoke.py from outside the
# source tree. The clean venv gets the CI venv's packages (torch, numpy, ...) through a .pth
# path line, so nothing is downloaded; that path line does not run the CI venv's own .pth
# files, so its editable llada_kernels stays out of sight, and the smoke test checks that the
# wheel's copy is the one imported.
#   PY: the CI venv's python (default .venv/bin/python). The wheel is built with the C++ CPU
#   kernels only (LLADA_NO_CUDA=1) unless WHEEL_CUDA=1: the CUDA objects would be compiled a
#   second time, and no GPU runs them here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="$(realpath -s "${PY:-.venv/bin/python}")"
start=$(date +%s)
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [ "${WHEEL_CUDA:-0}" = 1 ]; then unset LLADA_NO_CUDA; else export LLADA_NO_CUDA=1; fi
PYTHON="$PY" tools/build_wheel.sh "$WORK/dist"
built=$(date +%s)
"$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv --without-pip "$WORK/venv"
site="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/ci-venv-packages.pth"
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-deps --no-index "$WORK"/dist/*.whl
cd "$WORK"
"$WORK/venv/bin/python" -I "$ROOT/tests/wheel_smoke.py"
echo "== wheel check: build + repair $(( built - start )) s, venv + install + smoke test $(( $(date +%s) - built )) s"
