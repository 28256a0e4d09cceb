"""Moved to ``bitfast.train.ridge``; this path still imports (deprecated)."""

import warnings

from bitfast.train.ridge import *  # noqa: F403
from bitfast.train.ridge import __all__  # noqa: F401

warnings.warn("bitfast.train.fewshot moved to bitfast.train.ridge; import it from there", DeprecationWarning,
              stacklevel=2)
