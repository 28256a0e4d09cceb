"""Moved to ``bitfast.train.recipes.story``; this path still imports (deprecated)."""

import warnings

from bitfast.train.recipes.story import *  # noqa: F403
from bitfast.train.recipes.story import __all__  # noqa: F401

warnings.warn("bitfast.train.story moved to bitfast.train.recipes.story; import it from there", DeprecationWarning,
              stacklevel=2)
