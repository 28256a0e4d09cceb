"""Does an error raised inside a C++ torch extension reach Python as a RuntimeError on this
machine, or does it crash the process? A diagnostic for benchmarks/gpu_check.sh: on the
lent H100 (torch 2.11, CUDA 13) bitfast's native ops crashed with a segmentation fault at
their first argument error, in the CPU extension and the CUDA one alike, while the same
code raises RuntimeErrors under torch 2.13 on CPU. This builds minimal extensions with the
machine's own compiler and torch (``torch.utils.cpp_extension.load_inline``), one per set
of flags, each raising a ``TORCH_CHECK`` error through a registered op, and runs each in a
child process, so a crash is reported rather than suffered.

    python benchmarks/throw_probe.py [--build-dir DIR]

Prints one line per variant ("raised RuntimeError" or "crashed: signal N") and exits 1 if
any variant crashed.
"""

import argparse
import os
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace {
at::Tensor throw_if_1d(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "probe: x has ", x.dim(), " dims (shape ", x.sizes(), "); expected >= 2");
  return x;
}
}  // namespace

TORCH_LIBRARY(NAMESPACE, m) { m.def("throw_if_1d(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(NAMESPACE, CPU, m) { m.impl("throw_if_1d", &throw_if_1d); }
"""

# name -> extra compiler flags: torch's defaults, then bitfast's (setup.py)
VARIANTS = {
    "defaults": [],
    "bitfast_flags": ["-O3", "-fopenmp"],
}

CHILD = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
name, flags, build = sys.argv[1], sys.argv[2].split() if sys.argv[2] else [], sys.argv[3]
src = {src!r}.replace("NAMESPACE", name)
load_inline(name, cpp_sources=src, extra_cflags=flags, extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
            is_python_module=False, build_directory=build, verbose=False)
op = getattr(torch.ops, name).throw_if_1d
assert op(torch.zeros(2, 2)).shape == (2, 2)
try:
    op(torch.zeros(3))
except RuntimeError as e:
    print("raised RuntimeError:", str(e).splitlines()[0])
    sys.exit(0)
print("no error raised")
sys.exit(3)
"""


def main(argv=None) -> int:
    """Build and run each variant in a child process; return 1 if any crashed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build-dir", default=None, help="where to build (default: a temporary directory)")
    args = p.parse_args(argv)
    root = args.build_dir or tempfile.mkdtemp(prefix="bitfast_throw_probe_")
    crashed = False
    for name, flags in VARIANTS.items():
        build = os.path.join(root, name)
        os.makedirs(build, exist_ok=True)
        child = subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", CHILD.format(src=SOURCE), f"bitfast_probe_{name}",
             " ".join(flags), build],
            capture_output=True, text=True, timeout=300,
        )
        if child.returncode < 0:
            crashed = True
            verdict = f"crashed: signal {-child.returncode}"
        elif child.returncode == 0:
            verdict = child.stdout.strip().splitlines()[-1]
        else:
            verdict = f"exit {child.returncode}: " + (child.stdout + child.stderr).strip()[-400:]
        print(f"throw_probe {name} (flags: {' '.join(flags) or 'torch defaults'}): {verdict}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
