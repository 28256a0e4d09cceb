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

from bitfast import _exports, _native
from bitfast.ops import reference

__all__ = ["reference", *_exports.export_submodules(globals(), lambda n: not n.startswith("_") and n != "reference")]

# Every op module has defined its schemas (define_op): now the native builds may attach their
# kernels to them.
_native.load_all()
