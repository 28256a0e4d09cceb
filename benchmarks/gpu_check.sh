#!/usr/bin/env bash
# One-call check of bitfast on a lent GPU machine (H100/H200, torch + CUDA, triton, timm,
# no internet): print the device and versions, build the CUDA extension, run the CUDA tests,
# run `bitfast bench --quick` (every op on every backend against the eager, torch.compile and
# torch.optim.SGD baselines, and the BiT-R50x1 training step at 224x224, bf16, channels_last,
# batch 128), and leave the logs, bench.json and bench.md in the output directory (first
# argument, else $OUT, else benchmarks/results/local). The bench table is printed last.
# Fails loudly on the first broken step. Budget: under 8 minutes on an H100 (build about
# 40 s, CUDA tests about 1 min, bench about 3 min).
#
# Without a GPU (a dry run on a developer machine) it says so, skips the build and the CUDA
# tests, and runs the bench on the CPU.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/local}}
mkdir -p "$out"
py=${PYTHON:-python3}
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
t_start=$(date +%s)

step "device and versions"
if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    gpu=1
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/device.txt"
else
    gpu=0
    echo "no CUDA GPU visible to torch: dry run (build and CUDA tests skipped, bench on CPU)" | tee "$out/device.txt"
fi
"$py" - <<'PY' | tee -a "$out/device.txt"
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("triton", "timm"):
    try:
        print(name, __import__(name).__version__)
    except ImportError:
        print(name, "not installed")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
else:
    print("device cpu |", os.cpu_count(), "cores")
PY
git log -1 --format='bitfast commit %H %s' 2>/dev/null | tee -a "$out/device.txt" || true

if [ "$gpu" = 1 ]; then
    step "build (pip install --no-build-isolation -e .)"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
    export BITFAST_BUILD_CPP=1 BITFAST_BUILD_CUDA=1
    start=$(date +%s)
    "$py" -m pip install --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1 \
        || { tail -40 "$out/build.log"; fail "build (log: $out/build.log)"; }
    echo "built in $(( $(date +%s) - start )) s"
else
    step "build: skipped (no GPU; the installed build is used)"
fi
"$py" -m bitfast.cli env | tee "$out/env.txt"
if [ "$gpu" = 1 ]; then
    "$py" -c "import bitfast, sys; b = bitfast.available_backends(); print(b); sys.exit(0 if {'cpp', 'cuda', 'triton'} <= set(b) else 1)" \
        || fail "the cpp, cuda and triton backends are not all available"
fi

if [ "$gpu" = 1 ]; then
    step "CUDA tests"
    # Compiled Triton on the GPU, not the interpreter.
    export TRITON_INTERPRET=0
    # BITFAST_GPU_TESTS narrows the selection (a pytest -k expression) when device time is short.
    if ! "$py" -m pytest tests -q -k "${BITFAST_GPU_TESTS:-cuda}" -p no:cacheprovider -o addopts="" -rs --durations=10 \
        --junitxml="$out/cuda-tests.xml" 2>&1 | tee "$out/cuda-tests.log"; then
        fail "CUDA tests (log: $out/cuda-tests.log)"
    fi
else
    step "CUDA tests: skipped (no GPU)"
fi

step "bitfast bench --quick (ops and the BiT-R50x1 train step)"
unset TRITON_INTERPRET
# The table goes to bench.txt (printed at the end); the progress lines stream here.
if ! "$py" -m bitfast.cli bench --quick --json "$out/bench.json" --markdown "$out/bench.md" 2>&1 >"$out/bench.txt" \
        | tee "$out/bench-progress.log"; then
    fail "bitfast bench (log: $out/bench-progress.log)"
fi

step "done in $(( $(date +%s) - t_start )) s; results in $out (bench.md, bench.json, logs)"
cat "$out/bench.txt"
