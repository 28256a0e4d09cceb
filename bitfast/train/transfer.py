"""Moved to ``bitfast.train.recipes.fewshot``; this path still imports (deprecated)."""

import warnings

from bitfast.train.recipes.fewshot import *  # noqa: F403
from bitfast.train.recipes.fewshot import __all__  # noqa: F401

warnings.warn("bitfast.train.transfer moved to bitfast.train.recipes.fewshot; import it from there", DeprecationWarning,
              stacklevel=2)
