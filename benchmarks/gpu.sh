#!/usr/bin/env bash
# The GPU work of resfuse, start to finish, on a machine with an NVIDIA GPU and a network:
#   bash benchmarks/gpu.sh [gpu_latency.py options, e.g. --methods masked]
# It installs from the package registries. On a machine with no network, use
# benchmarks/gpu_check.sh WHEELS_DIR instead: it installs from a folder of wheels brought along
# (its header says which, and how to make it) and fits its steps in 8 minutes.
# 1. makes (or reuses) .venv with the Makefile's recipe;
# 2. swaps onnxruntime for onnxruntime-gpu (downloaded first: a failed download keeps the CPU
#    package); TensorRT is used only where it is already importable (the registry's tensorrt
#    wheels fetch it from NVIDIA at install time), else its tests and rows are skipped;
# 3. runs the GPU tests, pytest -m "gpu or tensorrt" (log: benchmarks/results/gpu-tests.log);
# 4. runs benchmarks/gpu_latency.py, which writes benchmarks/results/gpu.json and gpu.md;
# 5. benchmarks/gpu_verdict.py: each GPU path run or not run, and why.
# Exits non-zero when there is no CUDA device, when the tests or the benchmark failed, or when
# no GPU test ran at all (every one skipped).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
RESULTS=benchmarks/results

make --no-print-directory VENV="$VENV" "$VENV/.installed"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device; run this on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 1
fi

has_cuda_ep() {
    "$PY" -c 'import sys, onnxruntime as o; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null
}
if ! has_cuda_ep; then
    wheels="$(mktemp -d)"
    if "$PY" -m pip download --quiet --no-deps --dest "$wheels" onnxruntime-gpu; then
        "$PY" -m pip uninstall --quiet -y onnxruntime
        "$PY" -m pip install --quiet "$wheels"/onnxruntime_gpu-*.whl
    else
        echo "gpu.sh: onnxruntime-gpu could not be downloaded; the ONNX Runtime CUDA rows are skipped" >&2
    fi
    rm -rf "$wheels"
fi
if ! "$PY" -c 'import tensorrt; tensorrt.Runtime' 2>/dev/null; then
    echo "gpu.sh: TensorRT is not importable here; its tests and rows are skipped (install NVIDIA's tensorrt wheel for this CUDA, e.g. pip install tensorrt-cu12, where NVIDIA's index is reachable)" >&2
fi

mkdir -p "$RESULTS"
status=0
"$PY" -m pytest -m "gpu or tensorrt" -rA --junitxml "$RESULTS/gpu-tests.xml" 2>&1 |
    tee "$RESULTS/gpu-tests.log" || status=1
"$PY" benchmarks/gpu_latency.py --output "$RESULTS" "$@" || status=1
# per path, run or not run and why; fails when every GPU test skipped (docs/gpu.md)
"$PY" benchmarks/gpu_verdict.py "$RESULTS" | tee "$RESULTS/gpu-verdict.md" || status=1
exit "$status"
