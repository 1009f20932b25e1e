#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build with the CUDA kernels, run the GPU tests, then the
# benchmark suite on CUDA tensors. Results land in benchmarks/results/ (and in $OUT if set).
set -euo pipefail
cd "$(dirname "$0")/../.."
export LLADA_CUDA_ARCHS="${LLADA_CUDA_ARCHS:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "9.0")}"
make install
.venv/bin/python -m pytest tests/gpu -v -p no:cacheprovider 2>&1 | tee ${OUT:+$OUT/}gpu-tests.log
.venv/bin/python benchmarks/run.py -k "cuda" 2>&1 | tee ${OUT:+$OUT/}gpu-bench.log
[ -n "${OUT:-}" ] && cp benchmarks/results/results.csv "$OUT/" || true
