"""Moved to ``bitfast.train.losses``; this path still imports (deprecated)."""

import warnings

from bitfast.train.losses import *  # noqa: F403
from bitfast.train.losses import __all__  # noqa: F401

warnings.warn("bitfast.train.distill moved to bitfast.train.losses; import it from there", DeprecationWarning,
              stacklevel=2)
