#!/usr/bin/env bash
# One-call check of bitfast on a lent GPU machine (H100/H200, torch + CUDA, triton, timm,
# pytest-xdist, no internet): print the device and versions, build the CUDA extension, run
# the CUDA tests, measure the BiT-R50x1 training step (224x224, bf16 autocast, channels_last,
# batch 128: bitfast, bitfast-compile and bitfast-cudagraphs, the whole step in a CUDA graph,
# against eager and torch.compile in its default and reduce-overhead modes; then, as its own
# step, compile's max-autotune-no-cudagraphs mode and timm), run `bitfast bench --quick` on
# the ops (every backend against the eager, torch.compile and torch.optim.SGD baselines), the
# launch-configuration sweep, and the norm kernels in fp32/bf16, NCHW/channels_last
# (tools/cuda_norms.py). Logs and results go to the output directory (first argument, else
# $OUT, else benchmarks/results/local); a summary is printed last.
#
# Every step runs under a time cap inside one budget (BITFAST_GPU_BUDGET seconds, default
# 360: six minutes, so that a second call fits in a 15-minute lease), most important first;
# a step that does not fit what is left is skipped and named; a failing step is reported and
# the next one still runs; the exit status is non-zero if any step failed. A bench case that
# fails (a compile, a capture) is listed as FAILED and the others are still measured, and
# each measured case is logged as it finishes, so a step cut by its cap keeps its rows.
# On an H100: build about 1.5 min, tests about 1.5 min, the train step 2-3 min (most of it
# torch.compile). BITFAST_GPU_STEPS picks and orders the steps after the build (default
# "tests,train,ops,sweep,autotune,norms": the CUDA tests; the train-step table; the op
# benchmarks; the launch-configuration sweep of GroupNorm+ReLU and SGD (tools/kernel_sweep.py,
# about 90 s, then one capped ncu or nsys profile of each kernel's default when the machine
# has a profiler); the max-autotune and timm rows of the train step; the norm kernels;
# errors: the native ops' argument errors on CPU and CUDA in child processes, with on a crash
# a cuda-gdb backtrace, the CPU checks again under candidate workarounds, torch's own C++
# errors as controls, and tools/throw_probe.py; it runs by itself right after the tests when
# their log shows a crash, or when listed); BITFAST_GPU_NORMS_ARGS passes arguments to
# tools/cuda_norms.py; BITFAST_SWEEP_BUDGET (default 90) is the seconds after which the sweep
# starts no new measurement.
#
# Without a GPU (a dry run on a developer machine) it says so, skips the build, the CUDA
# tests and the CUDA norm timings, and runs the bench on the CPU.
#
#   bash tools/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/local}}
mkdir -p "$out"
py=${PYTHON:-python3}
t_start=$(date +%s)
deadline=$(( t_start + ${BITFAST_GPU_BUDGET:-360} ))
failed=()
skipped=()
step() { echo; echo "== $* ($(date -u +%H:%M:%S), $(( $(date +%s) - t_start )) s in)"; }
left() { echo $(( deadline - $(date +%s) )); }
# timed NAME CAP MIN CMD...: run CMD under min(CAP, time left) seconds, or skip it when less
# than MIN seconds are left; a non-zero exit (124: out of time) is recorded as a failure.
timed() {
    local name=$1 cap=$2 min=$3 t rc
    shift 3
    t=$(left)
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt "$min" ]; then
        echo "gpu_check: $name skipped: ${t} s left of the budget (needs ${min} s)"
        skipped+=("$name")
        return 0
    fi
    timeout -k 10 "$t" "$@"
    rc=$?
    if [ "$rc" != 0 ]; then
        echo "gpu_check: $name FAILED (exit $rc$([ "$rc" = 124 ] && echo ", out of its ${t} s"))"
        failed+=("$name (exit $rc)")
    fi
    return 0
}

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
for name in ("triton", "timm", "xdist", "pytest_timeout"):
    try:
        print(name, getattr(__import__(name), "__version__", "installed"))
    except ImportError:
        print(name, "not installed")
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "| SMs", torch.cuda.get_device_properties(0).multi_processor_count)
else:
    print("device cpu |", os.cpu_count(), "cores")
PY
git log -1 --format='bitfast commit %H %s' 2>/dev/null | tee -a "$out/device.txt" || true
git status --short 2>/dev/null | head -20 | sed 's/^/uncommitted: /' | tee -a "$out/device.txt" || true

build() {
    local start
    start=$(date +%s)
    "$py" -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$out/build.log" 2>&1 \
        || { tail -60 "$out/build.log"; return 1; }
    echo "built in $(( $(date +%s) - start )) s"
}
if [ "$gpu" = 1 ]; then
    step "build (pip install --no-build-isolation -e .)"
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
    export BITFAST_BUILD_CPP=1 BITFAST_BUILD_CUDA=1
    export py out
    export -f build
    timed build 300 60 bash -c build
else
    step "build: skipped (no GPU; the installed build is used)"
fi
"$py" -m bitfast.cli env | tee "$out/env.txt"
if [ "$gpu" = 1 ]; then
    "$py" -c "import bitfast, sys; b = bitfast.available_backends(); print(b); sys.exit(0 if {'cpp', 'cuda', 'triton'} <= set(b) else 1)" \
        || failed+=("backends: cpp, cuda and triton not all available")
fi

errors_step() {
    # Bad arguments to the native ops must raise RuntimeErrors, not crash the process. On the
    # first crash: a backtrace under cuda-gdb (it debugs CPU-only programs too); after any,
    # tools/throw_probe.py, which tells whether any extension built here crashes so.
    local dev rc code bad=0
    for dev in cpu cuda; do
        code="import tests.ops._native_cases as t; t.check_errors('$dev'); t.check_norm_errors('$dev'); print('argument errors on $dev: RuntimeErrors as expected')"
        "$py" -X faulthandler -c "$code"
        rc=$?
        if [ "$rc" != 0 ]; then
            echo "the $dev error checks exited with $rc"
            if [ "$bad" = 0 ] && command -v cuda-gdb >/dev/null; then
                echo "backtrace under cuda-gdb:"
                timeout 90 cuda-gdb -batch -ex run -ex bt --args "$py" -c "$code" 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -60
            fi
            bad=1
        fi
    done
    if [ "$bad" = 1 ]; then
        # what the extensions were built with and load next to
        echo "compiler: $(c++ --version 2>&1 | head -1)"
        env | grep -E '^(TORCH_[A-Z_]*|CC|CXX|CFLAGS|CXXFLAGS|LDFLAGS|LD_PRELOAD|LD_LIBRARY_PATH)=' | sed 's/^/env: /'
        for so in bitfast/_C*.so; do
            echo "$so:"; ldd "$so" | grep -E "stdc|gcc_s|gomp|c10|torch_cpu|python" | sed 's/^/  /'
        done
        # Candidate workarounds, each the CPU checks again in a child: no C++ backtrace
        # symbolization; the compiler's own C++ runtime and unwinder loaded first; one
        # OpenMP thread. A variant that passes names the cause and the fix.
        code="import tests.ops._native_cases as t; t.check_errors('cpu'); t.check_norm_errors('cpu')"
        workaround() {  # workaround VAR=VALUE...: the exit status of the CPU checks under them
            echo "workaround $*: exit $(env "$@" timeout 60 "$py" -c "$code" >/dev/null 2>&1; echo $?)"
        }
        workaround TORCH_SHOW_CPP_STACKTRACES=0 TORCH_DISABLE_ADDR2LINE=1
        workaround LD_PRELOAD="$(c++ -print-file-name=libstdc++.so.6):$(c++ -print-file-name=libgcc_s.so.1)"
        workaround OMP_NUM_THREADS=1
        # Controls: an error raised by torch's own C++ code, without bitfast, with bitfast
        # imported, and on a CUDA tensor. If these crash too, any C++ error crashes this
        # machine's torch and bitfast's code is not the cause.
        local setup r
        for setup in "import torch; dev = 'cpu'" "import torch, bitfast; dev = 'cpu'" \
                     "import torch, bitfast; dev = 'cuda'"; do
            r=$(timeout 60 "$py" -c "$setup
try:
    torch.ones(2, device=dev) + torch.ones(3, device=dev)
except RuntimeError:
    print('raised RuntimeError')" 2>&1)
            echo "control [$setup]: exit $?: $(echo "$r" | tail -1)"
        done
        timeout 170 "$py" tools/throw_probe.py
    fi
    return $bad
}

tests_step() {
    # Compiled Triton on the GPU, not the interpreter.
    local extra=()
    # Several worker processes when pytest-xdist is there (faster; a crashing test takes one
    # worker down, not the run), and a per-test time limit when pytest-timeout is.
    "$py" -c "import xdist" 2>/dev/null && extra+=(-n "${BITFAST_GPU_WORKERS:-12}")
    "$py" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 180)
    # BITFAST_GPU_TESTS narrows the selection (a pytest -k expression) when device time is
    # short. The nvcc compile check is left out: the build above compiled every .cu file.
    TRITON_INTERPRET=0 "$py" -m pytest tests -q -p no:cacheprovider -o addopts="" -rfEs "${extra[@]}" \
        -k "${BITFAST_GPU_TESTS:-cuda and not test_cuda_sources_compile}" --durations=15 \
        --junitxml="$out/cuda-tests.xml" > "$out/cuda-tests.log" 2>&1
}

export py out
export -f errors_step tests_step
unset TRITON_INTERPRET
steps=${BITFAST_GPU_STEPS:-tests,train,ops,sweep,autotune,norms}
for s in $(echo "$steps" | tr ',' ' '); do
    case "$s" in
    errors)
        step "argument errors of the native ops (CPU, CUDA)"
        if [ "$gpu" = 1 ]; then
            timed "argument errors" 330 20 bash -c errors_step 2>&1 | tee "$out/errors.log"
            grep -q "argument errors on cuda: RuntimeErrors as expected" "$out/errors.log" || failed+=("argument errors")
        else
            echo "skipped (no GPU)"
        fi ;;
    tests)
        step "CUDA tests"
        if [ "$gpu" = 1 ]; then
            timed "CUDA tests" 150 60 bash -c tests_step
            grep -E "^(FAILED|ERROR)|passed|failed" "$out/cuda-tests.log" | tail -40
            # A crashed test (a killed worker, a fatal signal): the diagnostics now, unless listed.
            if grep -qE "Segmentation fault|Fatal Python error|crashed|node down|signal 11" "$out/cuda-tests.log" \
                && ! echo ",$steps," | grep -q ",errors,"; then
                step "the CUDA tests crashed: argument-error diagnostics"
                timed "argument errors" 330 20 bash -c errors_step 2>&1 | tee "$out/errors.log"
            fi
        else
            echo "skipped (no GPU)"
        fi ;;
    norms)
        step "CUDA norm kernels vs eager (tools/cuda_norms.py ${BITFAST_GPU_NORMS_ARGS:-})"
        if [ "$gpu" = 1 ]; then
            # shellcheck disable=SC2086
            timed "cuda_norms" 150 40 "$py" tools/cuda_norms.py ${BITFAST_GPU_NORMS_ARGS:-} \
                --json "$out/cuda-norms.json" --markdown "$out/cuda-norms.md" > "$out/cuda-norms.txt" 2>&1
            tail -5 "$out/cuda-norms.txt"
        else
            echo "skipped (no GPU)"
        fi ;;
    ops)
        step "bitfast bench --quick on the ops"
        timed "bench (ops)" 120 40 "$py" -m bitfast.cli bench --quick \
            --ops weight_standardize,weight_standardize_multi,group_norm_relu,group_norm_relu_add,batch_norm_relu,sgd_momentum \
            --json "$out/bench.json" --markdown "$out/bench.md" > "$out/bench.txt" 2>&1 ;;
    sweep)
        step "launch-configuration sweep of GroupNorm+ReLU and SGD (tools/kernel_sweep.py)"
        timed "kernel sweep" 150 40 "$py" tools/kernel_sweep.py "$out/sweep" --budget "${BITFAST_SWEEP_BUDGET:-90}" \
            > "$out/sweep.txt" 2>&1
        grep -E "^kernel_sweep|target|best|failed" "$out/sweep.txt" | cut -c1-200 | head -40
        step "profile of each kernel's default (ncu or nsys, capped)"
        if [ "$gpu" = 1 ] && command -v ncu >/dev/null; then
            # Nsight Compute: speed of light (DRAM and SM throughput), occupancy, launch
            # statistics of bitfast's kernels between cudaProfilerStart and Stop
            timed "ncu profile" 120 30 ncu --csv --page details --profile-from-start off \
                --section SpeedOfLight --section Occupancy --section LaunchStats \
                -k "regex:_gn_|_sgd_|_pointwise|_partials" \
                "$py" tools/kernel_sweep.py --profile-run > "$out/sweep/ncu.csv" 2> "$out/sweep/ncu.log"
            "$py" - "$out/sweep/ncu.csv" <<'PY' | tee "$out/sweep/ncu-summary.md"
import sys
from bitfast.bench.sweep import summarize_ncu_csv
rows = summarize_ncu_csv(open(sys.argv[1]).read())
keys = ["duration", "duration_unit", "dram_pct", "memory_pct", "sm_pct", "achieved_occupancy_pct",
        "theoretical_occupancy_pct", "registers", "block", "grid", "limiter"]
print("| kernel | " + " | ".join(keys) + " |")
print("|---" * (len(keys) + 1) + "|")
for r in rows:
    print(f"| {r['kernel'][:60]} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
print(f"{len(rows)} kernels profiled" if rows else "ncu recorded no kernel (see ncu.log)")
PY
        elif [ "$gpu" = 1 ] && command -v nsys >/dev/null; then
            # Nsight Systems: kernel times only (no DRAM bandwidth or occupancy)
            timed "nsys profile" 120 30 nsys profile --capture-range=cudaProfilerApi --stats=true --force-overwrite true \
                -o "$out/sweep/nsys" "$py" tools/kernel_sweep.py --profile-run > "$out/sweep/nsys.txt" 2>&1
            grep -A25 "cuda_gpu_kern_sum" "$out/sweep/nsys.txt" | cut -c1-200 | head -30
        else
            echo "profile skipped: $([ "$gpu" = 1 ] && echo "neither ncu nor nsys on this machine" || echo "no GPU")"
        fi ;;
    train)
        step "bitfast bench --quick on the BiT-R50x1 train step"
        timed "bench (train step)" 200 60 "$py" -m bitfast.cli bench --quick --ops train_step \
            --impls bitfast,bitfast-compile,bitfast-cudagraphs,eager,compile,compile-reduce-overhead \
            --json "$out/bench-train.json" --markdown "$out/bench-train.md" > "$out/bench-train.txt" 2>&1 ;;
    autotune)
        step "the train step's max-autotune and timm rows"
        timed "bench (train step, max-autotune)" 200 60 "$py" -m bitfast.cli bench --quick --ops train_step \
            --impls compile-max-autotune,timm \
            --json "$out/bench-train-autotune.json" --markdown "$out/bench-train-autotune.md" \
            > "$out/bench-train-autotune.txt" 2>&1 ;;
    *)
        failed+=("unknown step $s in BITFAST_GPU_STEPS") ;;
    esac
done

step "summary after $(( $(date +%s) - t_start )) s; results in $out"
for f in cuda-norms.txt bench.txt bench-train.txt bench-train-autotune.txt sweep.txt; do
    # the tables and what was not measured (each case's progress line is in the file)
    [ -f "$out/$f" ] && { echo "--- $f"; grep -v -e "^|--" -e "^\[[#.]*\] " "$out/$f" | cut -c1-230; }
done
[ -f "$out/cuda-tests.log" ] && { echo "--- CUDA tests"; grep -E "^(FAILED|ERROR)" "$out/cuda-tests.log" | cut -c1-200 | head -30; tail -1 "$out/cuda-tests.log"; }
[ ${#skipped[@]} -gt 0 ] && echo "gpu_check: skipped for time: ${skipped[*]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${failed[*]}"
    exit 1
fi
echo "gpu_check: all steps passed"
