#!/usr/bin/env bash
# The GPU check of resfuse for a lent machine with NO network (Python 3.12, torch with CUDA 13,
# onnx and onnxruntime (CPU) installed; no polygraphy, no TensorRT). With a network, use gpu.sh.
#   bash benchmarks/gpu_check.sh WHEELS_DIR [LOG_DIR]
#
# WHEELS_DIR holds the wheels resfuse lacks there. Make it on a machine with a network (pure-
# Python wheels and CPython 3.12 manylinux x86_64 builds, with their dependencies: copies of
# numpy, onnx, ... come along, and are installed only where the machine lacks them):
#   pip download --dest wheels --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     setuptools click rich onnxscript onnxslim onnxconverter-common safetensors filelock \
#     pytest hypothesis pillow pydicom polygraphy \
#     tensorrt-rtx-cu12-libs==1.7.1.116 tensorrt-rtx-cu12-bindings==1.7.1.116
#   pip wheel --no-deps --wheel-dir wheels tensorrt-rtx-cu12==1.7.1.116  # an sdist: pure Python
# Optional: an onnxruntime-gpu wheel (ONNX Runtime's CUDA EP path; PyPI's build wants CUDA 12
# libraries, torch's CUDA 13 wheels bring 13: without them its tests skip, saying so), whole or
# split where it is too big to carry whole (split -b 60M W.whl W.whl.part- gives W.whl.part-aa,
# -ab, ...: joined here), and torchvision where the machine lacks it (the build of its torch).
#
# Steps, each under `timeout`, all within BUDGET seconds of the start (the whole check ends in
# under 8 minutes); a step that fails or times out is recorded and the next one runs:
#   venv        WORK/venv: sees the machine's packages (its torch) and takes what it installs first
#   install     resfuse (editable) and each requirement it lacks, from WHEELS_DIR only
#   cudart      the CUDA runtime of the nvidia wheels, put on LD_LIBRARY_PATH for Polygraphy
#   export-*    masked-resnet18 float16 and float32 at 512 px at most (resfuse-export)
#   rtx-probe   TensorRT-RTX, 60 s: build (builder level 0), validity, one run (gpu_probe.py);
#               on a GPU it does not support (an H100 or H200 is 9.0) plans are built for 8.9
#               and the one expected result is INVALID with UNSUPPORTED_CC (anything else fails)
#   gpu-tests   pytest -m "gpu or tensorrt": among them tests/test_gpu_paths.py, what a
#               data-centre GPU runs without TensorRT (ONNX Runtime's CUDA EP against PyTorch on
#               the GPU, whole and tiled; an RTX plan for 8.9 refused on 9.0)
#   gpu-latency gpu_latency.py --methods masked --variants fp32 fp16, in the time left: torch
#               eager and torch.compile, ONNX Runtime's CUDA EP and whatever TensorRT runs here
# Then the verdict (gpu_verdict.py, from the JUnit report and the JSON the steps wrote): per
# path (ORT CUDA EP, ORT TensorRT EP, resfuse TensorRT runner, TensorRT-RTX) run or not run and
# why. Writes every log to LOG_DIR (default benchmarks/results/gpu-check-DATE), and the step
# table, the path table and the verdict line to LOG_DIR/summary.md (format: docs/gpu.md).
# Exit status: 0 only when some GPU test ran, none failed and no step failed or timed out; 1
# when nothing ran on a GPU (every GPU test skipped: the verdict line says so), when anything
# failed, or when it could not start (no wheels folder, no CUDA device; then nothing is written).
# PYTHON: the interpreter with the machine's torch (default python3). GPU_CHECK_WORK: the venv,
# artifacts and engines (default benchmarks/artifacts/gpu-check). GPU_CHECK_WITHOUT_GPU=1 runs
# it on a machine with no CUDA device, to check the check: every GPU step then skips or fails,
# and the verdict must say that nothing ran on a GPU.
set -uo pipefail

BUDGET=440  # seconds from the start; with the last step's kill grace and nvidia-smi, < 8 min
refuse() {
    echo "gpu_check.sh: $*; nothing was written" >&2
    exit 1
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    refuse "usage: bash benchmarks/gpu_check.sh WHEELS_DIR [LOG_DIR]"
fi
[ -d "$1" ] || refuse "wheels folder '$1' not found; make it on a machine with a network (the pip commands in this script's header) and pass its path"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || refuse "no '$PYTHON' here; set PYTHON to the interpreter that has the machine's torch"
[ "${GPU_CHECK_WITHOUT_GPU:-0}" = 1 ] || cuda="$(timeout 60 "$PYTHON" - 2>/dev/null <<'EOF'
try:
    import torch
except Exception as exc:  # ImportError, or OSError from its CUDA libraries
    print(f"cannot import torch ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    raise SystemExit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA device")
    raise SystemExit(1)
EOF
)" || refuse "$PYTHON: ${cuda:-could not run}; run this on the GPU machine, with PYTHON set to the interpreter whose torch is a CUDA build"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$(cd "$1" && pwd)"
LOGS="${2:-$ROOT/benchmarks/results/gpu-check-$(date +%Y%m%d-%H%M%S)}"
WORK="${GPU_CHECK_WORK:-$ROOT/benchmarks/artifacts/gpu-check}"
mkdir -p "$LOGS" "$WORK/artifacts" "$WORK/engines"
LOGS="$(cd "$LOGS" && pwd)"
WORK="$(cd "$WORK" && pwd)"
VENV="$WORK/venv"
PY="$VENV/bin/python"
export PYTHON WHEELS WORK VENV PY PIP_CONFIG_FILE=/dev/null
cd "$ROOT" || exit 1
ROWS=()

make_venv() {
    # --system-site-packages would show the base installation's packages only, not those of a
    # venv, user site or .pth folder that PYTHON sees: a .pth file names each folder on PYTHON's
    # sys.path after the venv's own (what is installed here comes first). Not the standard
    # library's (those of `python -S`): pip's isolated builds drop every folder that .pth adds.
    "$PYTHON" - "$VENV" <<'EOF'
import importlib.util, os, pathlib, subprocess, sys, sysconfig, venv

target = pathlib.Path(sys.argv[1])
# symlinks: a copied interpreter would not find a libpython that sits beside the original;
# ensurepip (offline) only where PYTHON has no pip of its own for the venv to borrow
venv.create(target, symlinks=True, with_pip=importlib.util.find_spec("pip") is None)
bare = subprocess.run([sys.executable, "-S", "-c", "import sys; print(*sys.path, sep='\\n')"],
                      capture_output=True, text=True, check=True).stdout.splitlines()
sites = [p for p in sys.path if p and os.path.isdir(p) and p not in bare]  # "": cwd
lib = sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)})
pathlib.Path(lib, "gpu-check-machine.pth").write_text("\n".join(sites) + "\n")
print(f"{target}: sees {', '.join(sites)}")
EOF
}

install_wheels() {
    local joined="$WORK/wheels" first
    mkdir -p "$joined"
    for first in "$WHEELS"/*.whl.part-aa; do  # a wheel carried in parts, joined in order
        [ -e "$first" ] || continue
        cat "${first%aa}"?? >"$joined/$(basename "${first%.part-aa}")" || return 1
    done
    # Only what the machine lacks (a package it has, at any version, is never replaced: pip
    # would otherwise weigh reinstalling torch), one pip call each, so that a wheel missing from
    # WHEELS_DIR costs only its own package. No index, no pip configuration, no PIP_* variables:
    # pip sees WHEELS_DIR and nothing else.
    local pip=("$PY" -m pip --isolated --disable-pip-version-check --no-input install --no-index
        --find-links "$WHEELS" --find-links "$joined") missing=() req
    "${pip[@]}" --no-deps -e . || missing+=(resfuse)
    local wanted=(pytest hypothesis pillow pydicom polygraphy tensorrt-rtx-cu12)
    compgen -G "$WHEELS/onnxruntime_gpu-*.whl" >/dev/null ||
        compgen -G "$joined/onnxruntime_gpu-*.whl" >/dev/null && wanted+=(onnxruntime-gpu)
    while read -r req; do
        "${pip[@]}" "$req" || missing+=("$req")
    done < <("$PY" - "${wanted[@]}" <<'EOF'
import importlib.metadata, re, sys, tomllib

with open("pyproject.toml", "rb") as f:
    wanted = tomllib.load(f)["project"]["dependencies"] + sys.argv[1:]
for requirement in wanted:
    try:
        importlib.metadata.distribution(re.match(r"[\w.-]+", requirement)[0])
    except importlib.metadata.PackageNotFoundError:
        print(requirement)
EOF
)
    [ ${#missing[@]} -eq 0 ] || { echo "missing from $WHEELS: ${missing[*]}"; return 1; }
    echo "every requirement is installed"
}
export -f make_venv install_wheels

# step [--expected-rc N] NAME SECONDS COMMAND...: runs COMMAND (or an exported function) under
# timeout, its output in LOGS/NAME.log, and adds its row: status, seconds, its log's last line.
step() {
    local expected=0
    if [ "$1" = --expected-rc ]; then expected=$2; shift 2; fi
    local name=$1 limit=$2 left=$((BUDGET - SECONDS)) rc=0 start=$SECONDS status
    shift 2
    if [ "$left" -lt 10 ]; then
        ROWS+=("| $name | skipped: out of time | 0 | |")
        return 1
    fi
    [ "$limit" -le "$left" ] || limit=$left
    declare -F "$1" >/dev/null && set -- bash -c '"$@"' bash "$@"
    echo "== $name (at most $limit s)"
    timeout --kill-after=5 "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    case $rc in
        0) status=ok ;;
        "$expected") status="expected refusal (exit $rc)" ;;
        124 | 137) status="TIMED OUT after $limit s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    local last
    # its last line with words in it, in ASCII (rich's tables draw boxes), cut to fit a cell
    last="$(grep '[[:alnum:]]' "$LOGS/$name.log" | tail -n 1 | LC_ALL=C tr -cd '[:print:]' |
        tr -s ' ' | sed 's/|/\\|/g' | cut -c1-160)"
    ROWS+=("| $name | $status | $((SECONDS - start)) | $last |")
    echo "   $status: $last"
    [ "$rc" -eq 0 ] || [ "$rc" -eq "$expected" ]
}

step venv 60 make_venv
step install 150 install_wheels
if step cudart 30 "$PY" -c 'import os; from resfuse.runtime.cudart import expose_cudart; expose_cudart(); print(os.environ["LD_LIBRARY_PATH"])'; then
    LD_LIBRARY_PATH="$(tail -n 1 "$LOGS/cudart.log")"
    export LD_LIBRARY_PATH
fi
artifacts=()
for precision in fp16 fp32; do
    name="masked-$precision"
    # the manifest's path as resfuse-export prints it: it may add a suffix (masked-fp16-fp16)
    step "export-$precision" 120 "$VENV/bin/resfuse-export" --method masked --name "$name" \
        --output "$WORK/artifacts" --max-size 512 --max-batch 2 --precision "$precision" &&
        artifacts+=("$(sed -n 's/^manifest: //p' "$LOGS/export-$precision.log" | tail -n 1)")
done
if [ ${#artifacts[@]} -gt 0 ]; then
    step --expected-rc 3 rtx-probe 60 "$PY" benchmarks/gpu_probe.py "${artifacts[@]}" \
        --cache "$WORK/engines" --output "$LOGS/rtx-probe.json"
else
    ROWS+=("| rtx-probe | skipped: no artifact was exported | 0 | |")
fi
step gpu-tests 240 "$PY" -m pytest -m "gpu or tensorrt" -rA -p no:cacheprovider \
    --continue-on-collection-errors --junitxml "$LOGS/gpu-tests.xml"
step gpu-latency 180 "$PY" benchmarks/gpu_latency.py --methods masked --variants fp32 fp16 \
    --rounds 3 --iters 5 --output "$LOGS/gpu-latency" --work "$WORK/gpu-latency"

# The verdict needs only the standard library: PYTHON runs it even where the venv failed.
verdict=0
timeout 60 "$PYTHON" benchmarks/gpu_verdict.py "$LOGS" >"$LOGS/verdict.md" 2>&1 || verdict=1
failed_steps="$(printf '%s\n' "${ROWS[@]}" | grep -c -E '\| (FAILED|TIMED OUT)')"

gpu="$(timeout 10 nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "GPU: ${gpu:-unknown (nvidia-smi gave nothing)}. $SECONDS s in all, of a $BUDGET s budget. Logs: $LOGS."
    echo
    echo "| step | status | seconds | last line of its log |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${ROWS[@]}"
    echo
    cat "$LOGS/verdict.md"
    [ "$failed_steps" -eq 0 ] || echo "gpu_check.sh: FAILED: $failed_steps steps failed or timed out (table above)"
} >"$LOGS/summary.md"
echo
cat "$LOGS/summary.md"
[ "$verdict" -eq 0 ] && [ "$failed_steps" -eq 0 ]
