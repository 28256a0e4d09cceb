"""Soft loading of the optional native builds ``bitfast._C`` and ``bitfast._C_cuda``, and
the dispatcher queries about them.

A missing or broken build is a fact for ``bitfast env`` to report, never an import error:
the ``reference`` backend always works. Loading an extension runs its static
``TORCH_LIBRARY_IMPL`` registrations, which attach kernels to the schemas each op module
defines (``bitfast.ops._register.define_op``); ``bitfast.ops`` loads the builds after
every op is defined.

A build made for other schemas (an extension left over from before the sources changed)
would abort the whole process inside those registrations, so before loading one bitfast
reads the schema fingerprint compiled into the library file (see ``schema_tag``) and
refuses a build whose fingerprint differs from the sources', with the command to rebuild.

This module sits below ``bitfast.backends`` and ``bitfast.ops`` and imports neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import mmap
import os

from bitfast import _schemas

EXTENSIONS = ("bitfast._C", "bitfast._C_cuda")
NAMESPACE = "bitfast"

_loaded: dict[str, bool] = {}
_errors: dict[str, str] = {}


_TAG_PREFIX = b"bitfast-schema-tag:"
REBUILD = "rebuild it: pip install --no-build-isolation -e . (or reinstall bitfast)"


def schema_tag() -> str:
    """The fingerprint of this bitfast's op schemas (every ``SCHEMAS`` of the op modules; see
    ``bitfast._schemas``), as setup.py computes it for the native builds."""
    return _schemas.fingerprint()


def built_schema_tag(path: str) -> str | None:
    """The schema fingerprint compiled into the native library at ``path`` (``None`` when
    it has none: a build from before fingerprints existed, or not a bitfast build)."""
    # Mapped, not read: this runs at every import, on libraries of tens of megabytes.
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(_TAG_PREFIX)
            if at < 0:
                return None
            end = data.find(b"\0", at)
            return data[at + len(_TAG_PREFIX) : end].decode("ascii", "replace")


def stale_reason(name: str, expected: str | None = None) -> str | None:
    """Why the extension ``name`` must not be loaded (it was built for other op schemas),
    or ``None`` when it matches (or is not installed: the import then says so)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        return None
    expected = expected or schema_tag()
    built = built_schema_tag(spec.origin)
    if built == expected:
        return None
    what = "without a schema fingerprint" if built is None else f"for other op schemas ({built} != {expected})"
    return f"{spec.origin} was built {what}; loading it would abort the process: {REBUILD}"


def _load(name: str) -> None:
    if name in _loaded:
        return
    try:
        stale = stale_reason(name)
        if stale:
            raise ImportError(stale)
        importlib.import_module(name)
    except Exception as exc:  # an ImportError, or an OSError from a bad CUDA runtime
        _loaded[name] = False
        _errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    else:
        _loaded[name] = True
        _errors[name] = ""


def load_all() -> None:
    """Try to load every optional extension once."""
    import torch

    _load("bitfast._C")
    if torch.version.cuda is not None:
        _load("bitfast._C_cuda")
    else:
        _loaded["bitfast._C_cuda"] = False
        _errors["bitfast._C_cuda"] = "this torch build has no CUDA"


def loaded(name: str) -> bool:
    """Whether the extension ``name`` (``bitfast._C`` or ``bitfast._C_cuda``) loaded."""
    load_all()
    return _loaded[name]


def load_error(name: str) -> str:
    """Why ``name`` did not load ('' when it did)."""
    load_all()
    return _errors[name]


def qualname(name: str) -> str:
    """``bitfast::name``: the qualified name of the op ``name``."""
    return f"{NAMESPACE}::{name}"


def has_native_kernel(name: str, device_type: str) -> bool:
    """Whether a native build attached a kernel for ``native_<name>`` on ``device_type``."""
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname("native_" + name), key)


def has_native_autograd(name: str) -> bool:
    """Whether ``bitfast._C`` attached a C++ autograd kernel to ``native_<name>``."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname("native_" + name), "Autograd")


# --------------------------------------------------------------------------------------
# Run-time launch settings of the CUDA kernels (csrc/cuda/launch_config.h)
# --------------------------------------------------------------------------------------

_cuda_lib = None


def _cuda_library_path() -> str:
    """The file of the ``bitfast._C_cuda`` extension."""
    return importlib.util.find_spec("bitfast._C_cuda").origin


def _cuda_library():
    """The loaded ``bitfast._C_cuda`` library, through ctypes (RuntimeError when it is not
    loaded)."""
    global _cuda_lib
    if _cuda_lib is None:
        import ctypes

        if not loaded("bitfast._C_cuda"):
            raise RuntimeError(f"CUDA launch settings need bitfast._C_cuda, which is not loaded: "
                               f"{load_error('bitfast._C_cuda') or 'not built'}")
        lib = ctypes.CDLL(_cuda_library_path())
        lib.bitfast_cuda_set_launch_knob.argtypes = [ctypes.c_char_p, ctypes.c_int64]
        lib.bitfast_cuda_set_launch_knob.restype = ctypes.c_int
        lib.bitfast_cuda_get_launch_knob.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64)]
        lib.bitfast_cuda_get_launch_knob.restype = ctypes.c_int
        lib.bitfast_cuda_launch_knob_names.argtypes = []
        lib.bitfast_cuda_launch_knob_names.restype = ctypes.c_char_p
        _cuda_lib = lib
    return _cuda_lib


def cuda_launch_knobs() -> dict[str, int]:
    """The launch settings of the CUDA kernels, name -> value (0: the built-in choice).
    The names and the values each takes are listed in csrc/cuda/launch_config.h."""
    import ctypes

    lib = _cuda_library()
    out = {}
    for name in lib.bitfast_cuda_launch_knob_names().decode().split(","):
        value = ctypes.c_int64()
        lib.bitfast_cuda_get_launch_knob(name.encode(), ctypes.byref(value))
        out[name] = value.value
    return out


def set_cuda_launch_knob(name: str, value: int) -> None:
    """Set one launch setting of the CUDA kernels for the whole process (0 restores the
    built-in choice); ValueError for an unknown name or a value outside its range."""
    rc = _cuda_library().bitfast_cuda_set_launch_knob(str(name).encode(), int(value))
    if rc == -1:
        raise ValueError(f"set_cuda_launch_knob: unknown setting {name!r}; expected one of "
                         f"{', '.join(cuda_launch_knobs())}")
    if rc == -2:
        raise ValueError(f"set_cuda_launch_knob: {name}={value} is outside the values it takes "
                         "(see csrc/cuda/launch_config.h)")


class cuda_launch_config:  # noqa: N801 (used as a context manager, like torch's)
    """Context manager: the CUDA kernels' launch settings ``knobs`` (name=value) inside the
    block, the previous values restored after it (also on an error)."""

    def __init__(self, **knobs: int) -> None:
        self.knobs = knobs
        self._saved: dict[str, int] = {}

    def __enter__(self) -> cuda_launch_config:
        self._saved = cuda_launch_knobs()
        try:
            for name, value in self.knobs.items():
                set_cuda_launch_knob(name, value)
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for name, value in self._saved.items():
            set_cuda_launch_knob(name, value)
