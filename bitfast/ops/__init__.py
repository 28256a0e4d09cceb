"""bitfast's public functional ops.

Each op is defined once, in its own module, through ``bitfast.ops._register.define_op``:
its ``torch.library`` schemas in the ``bitfast`` namespace, a fake implementation for
tracing, autograd where it is differentiable (one formula for the registered op and the
eager fast path), and the backend family ``bitfast.backends`` resolves. The
pure-PyTorch specification of every op is ``bitfast.ops.reference``.

This package imports every module of its folder (but the private ones and ``reference``)
and exports the names of each one's ``__all__``: an op's module is all it needs to be here.
Then, with every schema defined, the native builds attach their kernels.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from bitfast import _native
from bitfast.ops import reference

__all__ = ["reference"]

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "reference":
        continue
    _module = _importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)

# Every op module has defined its schemas (define_op): now the native builds may attach their
# kernels to them.
_native.load_all()
