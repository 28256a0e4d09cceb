"""The native build outside setup.py: CMake builds the C++ unit tests of csrc/cpu and runs
them with ctest, and compile-checks every csrc/cuda source with nvcc for sm_80 and sm_90,
so that a CUDA kernel that does not compile fails CI on machines without a GPU.

Each test configures and builds in a fresh temporary directory with the torch of the
running interpreter (about a minute or two each on 2 cores). They skip, saying why, when
cmake, a C++ compiler or (for the CUDA check) nvcc is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = os.environ.get("MAX_JOBS", "2")
# generous: two cold C++ builds against torch's headers on a slow CI machine
TIMEOUT = 1800


def _cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    if not any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++"))):
        pytest.skip("no C++ compiler found (c++, g++, clang++ or $CXX)")
    if not (ROOT / "CMakeLists.txt").exists():
        pytest.skip("CMakeLists.txt is not part of this checkout (installed package?)")
    return cmake


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _run(cmd: list[str], cwd: Path) -> str:
    """Runs cmd, failing the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stdout[-20000:]}")
    return proc.stdout


def _configure_and_build(build: Path, *options: str) -> str:
    cmake = _cmake()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    out = _run(
        [cmake, "-S", str(ROOT), "-B", str(build), *generator, f"-DBITFAST_PYTHON={sys.executable}", *options],
        cwd=ROOT,
    )
    _run([cmake, "--build", str(build), "-j", JOBS], cwd=ROOT)
    return out


def test_cpu_kernels_ctest(tmp_path):
    """csrc/cpu's kernels agree with plain C++ loops (fp32, fp64, every SGD option, odd
    shapes, non-contiguous tensors) and reject bad arguments with clear errors."""
    build = tmp_path / "build"
    _configure_and_build(build, "-DBITFAST_CPU_TESTS=ON", "-DBITFAST_CUDA_CHECK=OFF")
    ctest = shutil.which("ctest") or str(Path(_cmake()).with_name("ctest"))
    out = _run([ctest, "--test-dir", str(build), "--output-on-failure"], cwd=build)
    assert "tests passed" in out and "0 tests failed" in out, out


def test_cuda_sources_compile(tmp_path):
    """Every csrc/cuda source compiles with nvcc for sm_80 and sm_90 against the installed
    torch's headers (a CPU-only torch will do)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    build = tmp_path / "build"
    out = _configure_and_build(
        build, "-DBITFAST_CPU_TESTS=OFF", "-DBITFAST_CUDA_CHECK=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"
    )
    assert "compile-checking csrc/cuda" in out, f"CMake skipped the CUDA check:\n{out}"
    sources = sorted(p.name for p in (ROOT / "csrc" / "cuda").iterdir() if p.suffix in (".cu", ".cpp"))
    objects = {p.name.rsplit(".", 1)[0] for p in build.rglob("*.o")}
    missing = [s for s in sources if s not in objects]
    assert not missing, f"not compiled: {missing}"
