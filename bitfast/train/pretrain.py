"""Moved to ``bitfast.train.recipes.pretrain``; this path still imports (deprecated)."""

import warnings

from bitfast.train.recipes.pretrain import *  # noqa: F403
from bitfast.train.recipes.pretrain import __all__  # noqa: F401

warnings.warn("bitfast.train.pretrain moved to bitfast.train.recipes.pretrain; import it from there", DeprecationWarning,
              stacklevel=2)
