"""Moved to ``bitfast.checkpoint.npz_writer`` (``bitfast.export`` is the inference export);
this path still imports (deprecated)."""

import warnings

from bitfast.checkpoint.npz_writer import *  # noqa: F403
from bitfast.checkpoint.npz_writer import __all__  # noqa: F401

warnings.warn("bitfast.checkpoint.export moved to bitfast.checkpoint.npz_writer; import it from there",
              DeprecationWarning, stacklevel=2)
