"""Moved to ``bitfast.data.sampling`` (the one data order of training and ``make_loader``);
this path still imports (deprecated)."""

import warnings

from bitfast.data.sampling import *  # noqa: F403
from bitfast.data.sampling import __all__  # noqa: F401

warnings.warn("bitfast.train.sampling moved to bitfast.data.sampling; import it from there", DeprecationWarning,
              stacklevel=2)
