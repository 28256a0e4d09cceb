"""Moved to ``bitfast.train.recipes.finetune``; this path still imports (deprecated)."""

import warnings

from bitfast.train.recipes.finetune import *  # noqa: F403
from bitfast.train.recipes.finetune import __all__  # noqa: F401

warnings.warn("bitfast.train.finetune moved to bitfast.train.recipes.finetune; import it from there", DeprecationWarning,
              stacklevel=2)
