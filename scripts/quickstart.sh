#!/usr/bin/env bash
# Set up bitfast in a virtual environment (./.venv by default) and run one of:
#   demo   the main job: the BiT story on the embedded digits (bitfast story): upstream
#          training on 0-4, few-shot and fine-tuned transfer to 5-9 vs from scratch, in a few
#          minutes on a CPU; prints the table, writes plots to runs/story/
#          (the checkpoint-loading demo is `bitfast demo`)
#   test   ruff check, the test suite (pytest; benchmarks are not collected), then the
#          benchmarks' smoke run (pytest benchmarks/ --benchmark-disable: each case once)
#   setup  only the set-up
# Idempotent: a second run reuses the environment. Knobs: BITFAST_VENV (path),
# BITFAST_TORCH (the torch requirement installed when the environment has none;
# default torch==2.13.0, the CPU build; on a GPU cluster install your CUDA torch first),
# PYTHON (interpreter used to create the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BITFAST_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q "${BITFAST_TORCH:-torch==2.13.0}"
fi
# Dependencies that need torch come after it; bitfast builds against the torch installed
# (--no-build-isolation: an isolated build would pull another torch).
"$py" -m pip install -q numpy setuptools wheel ninja pytest pytest-benchmark safetensors ruff triton pillow matplotlib huggingface_hub
"$py" -m pip install -q --no-build-isolation -e .
case "${1:-demo}" in
    demo) shift || true; exec "$venv/bin/bitfast" story "$@" ;;
    test) shift || true
        "$venv/bin/ruff" check .
        "$py" -m pytest "$@"
        # Arguments go to the main suite only; the smoke run keeps the benchmarks from rotting.
        exec "$py" -m pytest benchmarks/ --benchmark-disable -q -p no:cacheprovider ;;
    setup) "$venv/bin/bitfast" env ;;
    *) echo "usage: $0 [demo|test|setup] [args...]" >&2; exit 2 ;;
esac
