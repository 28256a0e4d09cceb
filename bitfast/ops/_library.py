"""The ``bitfast`` op namespace and how schemas enter it.

Each op module declares its schemas once, as a module-level literal ``SCHEMAS`` (op name ->
schema without the backend argument), and passes them to ``_register.define_op``, which
calls ``define`` here. Two families of ops come out of every entry:

* **Public ops** (``weight_standardize_fwd``, ``group_norm_relu_fwd`` ...): functional ops
  with a trailing ``str backend`` argument naming the implementation that computes them
  (``reference``, ``cpp``, ``cuda`` or ``triton``). They have a Python kernel for CPU and
  CUDA that hands the work to that backend, a fake (meta) implementation, and, for the
  forward ops, an autograd formula whose backward is itself a registered op. The backend is
  an argument rather than global state so that ``torch.compile`` sees it as a constant.
* **Native ops** (``native_*``): the same computations without the backend argument. Their
  kernels are attached from C++ (``TORCH_LIBRARY_IMPL(bitfast, CPU, m)`` in ``csrc/cpu``) and
  CUDA (``TORCH_LIBRARY_IMPL(bitfast, CUDA, m)`` in ``csrc/cuda``). The schemas are defined
  from Python so the ops (and their fakes) exist even when no native build loaded; the
  ``cpp`` and ``cuda`` backends call them. The native builds carry a fingerprint of every
  ``SCHEMAS`` literal (``bitfast._schemas``) and a build made for other schemas is refused.

Conventions shared by every op:

* statistics (mean, rstd, var) are float32 whatever the input dtype (float64 for float64);
* ``weight_standardize`` statistics have shape ``(O,)``; GroupNorm statistics ``(N, G)``;
  BatchNorm statistics ``(C,)``;
* outputs keep the input's dtype and memory format.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bitfast._native import NAMESPACE, has_native_kernel, qualname

__all__ = ["DEFINED", "NAMESPACE", "define", "has_native_kernel", "lib", "qualname"]

lib = torch.library.Library(NAMESPACE, "DEF")

# op name -> schema (without the backend argument), in the order the op modules defined them.
DEFINED: dict[str, str] = {}


def _with_backend(schema: str) -> str:
    args, _, ret = schema.partition(") ->")
    return f"{args}, str backend) ->{ret}"


def define(schemas: Mapping[str, str]) -> None:
    """Define the public op ``name(..., str backend)`` and the native op ``native_name(...)``
    of every ``name: schema`` entry."""
    for name, schema in schemas.items():
        if name in DEFINED:
            raise ValueError(f"bitfast op {name!r} is defined twice")
        lib.define(name + _with_backend(schema))
        lib.define("native_" + name + schema)
        DEFINED[name] = schema
