"""Soft loading of the optional native builds ``bitfast._C`` and ``bitfast._C_cuda``.

A missing or broken build is a fact for ``bitfast env`` to report, never an import error:
the ``reference`` backend always works. Loading an extension runs its static
``TORCH_LIBRARY_IMPL`` registrations, which attach kernels to the schemas defined in
``bitfast.ops._library``.
"""

from __future__ import annotations

import importlib

EXTENSIONS = ("bitfast._C", "bitfast._C_cuda")

_loaded: dict[str, bool] = {}
_errors: dict[str, str] = {}


def _load(name: str) -> None:
    if name in _loaded:
        return
    try:
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
