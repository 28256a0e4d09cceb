"""Does an error raised inside a C++ torch extension reach Python as a RuntimeError on this
machine, or does it crash the process? A diagnostic for tools/gpu_check.sh: on the
lent H100 (torch 2.11, CUDA 13) bitfast's native ops crashed with a segmentation fault at
their first argument error, in the CPU extension and the CUDA one alike, while the same
code raises RuntimeErrors under torch 2.13 on CPU. This builds minimal extensions with the
machine's own compiler and torch (``torch.utils.cpp_extension.load_inline``), one per
variant, each raising a ``TORCH_CHECK`` error through a registered op, and runs each in a
child process, so a crash is reported rather than suffered.

    python tools/throw_probe.py [--build-dir DIR]

Three ways of raising (TORCH_CHECK, which captures a C++ backtrace as the c10::Error is
made; a c10::Error made without one; a plain std::runtime_error), each in its own child
process, for torch's default flags and for bitfast's, and with bitfast's flags for an
extension that, like bitfast, attaches only kernels in C++ to op schemas defined from
Python. Prints one line per case ("raised RuntimeError" or "crashed: signal N") and exits 1
if any crashed.
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

#include <stdexcept>

namespace {
// TORCH_CHECK: a c10::Error that captures a C++ backtrace as it is made.
at::Tensor torch_check(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "probe: x has ", x.dim(), " dims (shape ", x.sizes(), "); expected >= 2");
  return x;
}
// A c10::Error made without a backtrace.
at::Tensor c10_error_no_backtrace(const at::Tensor& x) {
  if (x.dim() < 2) throw c10::Error(c10::str("probe: x has ", x.dim(), " dims"), nullptr);
  return x;
}
// A plain C++ exception.
at::Tensor std_runtime_error(const at::Tensor& x) {
  if (x.dim() < 2) throw std::runtime_error("probe: x has fewer than 2 dims");
  return x;
}
}  // namespace

TORCH_LIBRARY_IMPL(NAMESPACE, CPU, m) {
  m.impl("torch_check", &torch_check);
  m.impl("c10_error_no_backtrace", &c10_error_no_backtrace);
  m.impl("std_runtime_error", &std_runtime_error);
}
"""

# How the error is raised: each kind in its own child process, so one crash hides nothing.
KINDS = ("torch_check", "c10_error_no_backtrace", "std_runtime_error")
SCHEMA = "(Tensor x) -> Tensor"  # every kind's op

# The op schemas defined in the extension's C++, appended to SOURCE for the "cpp" variants.
CPP_SCHEMAS = "TORCH_LIBRARY(NAMESPACE, m) {\n" + "".join(f'  m.def("{k}{SCHEMA}");\n' for k in KINDS) + "}\n"

# name -> (extra compiler flags, where the op schemas are defined): torch's default flags,
# then bitfast's (setup.py); the schemas in the extension's C++ (TORCH_LIBRARY), or in
# Python with only the kernels attached from C++, as bitfast does (each bitfast/ops/<op>.py).
VARIANTS = {
    "defaults": ([], "cpp"),
    "bitfast_flags": (["-O3", "-fopenmp"], "cpp"),
    "python_schema": (["-O3", "-fopenmp"], "python"),
}

CHILD = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
name, flags, build, kind, schema = sys.argv[1], sys.argv[2].split() if sys.argv[2] else [], *sys.argv[3:6]
src = {src!r}.replace("NAMESPACE", name)
if schema == "python":  # the source has only the kernels: define their schemas here first
    lib = torch.library.Library(name, "DEF")
    for k in {kinds!r}:
        lib.define(k + {op_schema!r})
load_inline(name, cpp_sources=src, extra_cflags=flags, extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
            is_python_module=False, build_directory=build, verbose=False)
if kind == "build":
    sys.exit(0)
op = getattr(getattr(torch.ops, name), kind)
assert op(torch.zeros(2, 2)).shape == (2, 2)
try:
    op(torch.zeros(3))
except RuntimeError as e:
    print("raised RuntimeError:", str(e).splitlines()[0])
    sys.exit(0)
print("no error raised")
sys.exit(3)
"""


def child_code(schema: str) -> str:
    """The child's program, with the extension source for schemas defined in ``schema``."""
    src = SOURCE + (CPP_SCHEMAS if schema == "cpp" else "")
    return CHILD.format(src=src, kinds=KINDS, op_schema=SCHEMA)


def main(argv=None) -> int:
    """Build and run each variant in a child process; return 1 if any crashed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build-dir", default=None, help="where to build (default: a temporary directory)")
    args = p.parse_args(argv)
    root = args.build_dir or tempfile.mkdtemp(prefix="bitfast_throw_probe_")
    crashed = False
    for variant, (flags, schema) in VARIANTS.items():
        build = os.path.join(root, variant)
        os.makedirs(build, exist_ok=True)
        name = f"bitfast_probe_{variant}"
        for kind in ("build",) + KINDS:
            child = subprocess.run(
                [sys.executable, "-X", "faulthandler", "-c", child_code(schema), name,
                 " ".join(flags), build, kind, schema],
                capture_output=True, text=True, timeout=300,
            )
            if child.returncode < 0:
                crashed = True
                verdict = f"crashed: signal {-child.returncode}"
            elif child.returncode == 0:
                verdict = "built" if kind == "build" else child.stdout.strip().splitlines()[-1]
            else:
                verdict = f"exit {child.returncode}: " + (child.stdout + child.stderr).strip()[-400:]
            print(f"throw_probe {variant} (flags: {' '.join(flags) or 'torch defaults'}; schemas in {schema}) {kind}: "
                  f"{verdict}")
            if kind == "build" and child.returncode != 0:
                break
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
