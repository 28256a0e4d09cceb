"""Build of bitfast: the pure-Python package, ``bitfast.kernels`` (Triton, from kernels/),
and two optional native extensions registered into the ``bitfast`` op namespace:

* ``bitfast._C``: C++ CPU kernels (csrc/module.cpp + csrc/cpu/*.cpp);
* ``bitfast._C_cuda``: CUDA kernels (csrc/module.cpp + csrc/cuda/*.cu), attempted only when
  torch has CUDA and nvcc is found.

Knobs (environment): ``BITFAST_BUILD_CPP`` and ``BITFAST_BUILD_CUDA`` = auto | 1 | 0.
``auto`` (default) turns a failed build into a warning (bitfast then runs on its other
backends); ``1`` makes a failure an error; ``0`` skips the extension. ``MAX_JOBS`` and
``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0`` when unset) are honoured. Install with
``pip install --no-build-isolation .`` so the build uses the torch already installed.
No network, GPU probing or downloads happen here.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def knob(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"setup.py: {name}={value!r}; expected auto, 1 or 0")
    return value


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    """The native extensions to build, and the build_ext command class."""
    want_cpp, want_cuda = knob("BITFAST_BUILD_CPP"), knob("BITFAST_BUILD_CUDA")
    if want_cpp == "0" and want_cuda == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if "1" in (want_cpp, want_cuda):
            sys.exit("setup.py: building bitfast's extensions needs torch installed first (--no-build-isolation)")
        warnings.warn("torch is not importable: building bitfast without native extensions", stacklevel=1)
        return [], {}

    # No -std flag: torch's extension builder adds the standard the installed torch was built
    # with (C++20 for torch 2.13, C++17 for older releases). Forcing one that differs from
    # libtorch's changes inline definitions in c10's headers: an extension built so crashed
    # when it raised its first error on torch 2.11 (H100, 2026-11-26).
    cxx = ["-O3"]
    # at::parallel_for runs on OpenMP inside the header: without -fopenmp every CPU kernel
    # would silently run on one thread. (GCC and Linux clang; Apple clang has no -fopenmp.)
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    exts = []
    if want_cpp != "0":
        exts.append(
            cpp_extension.CppExtension(
                "bitfast._C",
                ["csrc/module.cpp"] + rel("csrc/cpu/*.cpp"),
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx + openmp + ["-DBITFAST_MODULE_NAME=_C"]},
                extra_link_args=openmp,
            )
        )
    # Kernels in .cu files; the registrations in .cpp files, which the host compiler builds
    # faster than nvcc would.
    cuda_sources = rel("csrc/cuda/*.cu")
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    nvcc = nvcc or shutil.which("nvcc")
    if want_cuda != "0" and cuda_sources:
        reason = None
        if torch.version.cuda is None:
            reason = "this torch build has no CUDA"
        elif not nvcc:
            reason = "nvcc was not found (set CUDA_HOME)"
        if reason:
            if want_cuda == "1":
                sys.exit(f"setup.py: BITFAST_BUILD_CUDA=1 but {reason}")
        else:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            exts.append(
                cpp_extension.CUDAExtension(
                    "bitfast._C_cuda",
                    ["csrc/module.cpp"] + rel("csrc/cuda/*.cpp") + cuda_sources,
                    include_dirs=[os.path.join(ROOT, "csrc")],
                    extra_compile_args={
                        "cxx": cxx + ["-DBITFAST_MODULE_NAME=_C_cuda"],
                        "nvcc": ["-O3", "--use_fast_math", "-DBITFAST_MODULE_NAME=_C_cuda"],
                    },
                )
            )

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    required = {"bitfast._C": want_cpp == "1", "bitfast._C_cuda": want_cuda == "1"}

    class BuildExt(base):
        """Builds each extension on its own; an optional one that fails only warns."""

        def build_extensions(self):
            self._failed = set()
            super().build_extensions()
            # Forget the extensions that failed, so that the steps after the build (the copy
            # into the source tree of an editable install, the list of outputs) do not look
            # for their missing libraries. Filtered only now: the loop above walks the list.
            self.extensions = [e for e in self.extensions if e.name not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if required.get(ext.name):
                    raise
                self._failed.add(ext.name)
                warnings.warn(f"bitfast: building {ext.name} failed ({exc}); continuing without it", stacklevel=1)
                print(f"WARNING: bitfast: building {ext.name} failed: {exc}", file=sys.stderr)

    return exts, {"build_ext": BuildExt}


ext_modules, cmdclass = extensions()

setup(
    packages=[
        "bitfast",
        "bitfast.ops",
        "bitfast.nn",
        "bitfast.models",
        "bitfast.optim",
        "bitfast.checkpoint",
        "bitfast.data",
        "bitfast.train",
        "bitfast.kernels",
    ],
    package_dir={"bitfast.kernels": "kernels"},
    # The embedded default dataset (UCI handwritten digits, CC BY 4.0) and its license.
    package_data={"bitfast.data": ["digits.csv.gz", "DIGITS_LICENSE.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
