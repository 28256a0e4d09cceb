"""Moved to ``bitfast.train.recipes.distill``; this path still imports (deprecated)."""

import warnings

from bitfast.train.recipes.distill import *  # noqa: F403
from bitfast.train.recipes.distill import __all__  # noqa: F401

warnings.warn("bitfast.train.distillation moved to bitfast.train.recipes.distill; import it from there", DeprecationWarning,
              stacklevel=2)
