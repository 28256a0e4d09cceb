#!/usr/bin/env bash
# One-call check of bitfast on a lent GPU machine (H100/H200, torch + CUDA, triton, no
# internet): print the device and versions, build the CUDA extension, run the CUDA tests,
# time a BiT training step side by side with the eager baseline, and leave the logs and
# results in the output directory (first argument, else $OUT, else benchmarks/results/local).
# Fails loudly on the first broken step.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/local}}
mkdir -p "$out"
py=${PYTHON:-python3}
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

step "device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/device.txt"
"$py" - <<'PY' | tee -a "$out/device.txt"
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
print("device", torch.cuda.get_device_name(), "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
PY
git log -1 --format='bitfast commit %H %s' 2>/dev/null | tee -a "$out/device.txt" || true

step "build (pip install --no-build-isolation -e .)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export BITFAST_BUILD_CPP=1 BITFAST_BUILD_CUDA=1
start=$(date +%s)
"$py" -m pip install --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
"$py" -m bitfast.cli env | tee "$out/env.txt"
"$py" -c "import bitfast, sys; b = bitfast.available_backends(); print(b); sys.exit(0 if {'cpp', 'cuda', 'triton'} <= set(b) else 1)"

step "CUDA tests"
# Compiled Triton on the GPU, not the interpreter.
export TRITON_INTERPRET=0
# BITFAST_GPU_TESTS narrows the selection (a pytest -k expression) when device time is short.
"$py" -m pytest tests -q -k "${BITFAST_GPU_TESTS:-cuda}" -p no:cacheprovider -o addopts="" -rs --durations=10 \
    --junitxml="$out/cuda-tests.xml" 2>&1 | tee "$out/cuda-tests.log"

step "training step: bitfast vs the eager baseline"
"$py" benchmarks/quick_train_step.py --batch 128 --size 224 --dtype bf16 --json "$out/train_step.json" \
    | tee "$out/train_step.txt"
step "done"
