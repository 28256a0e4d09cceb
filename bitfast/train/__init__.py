"""bitfast's training library and the recipes built on it.

The library (importable without running anything): ``config`` (``TrainConfig``, every option
checked by ``validate``), ``loop`` (``train_loop``), ``task`` (how a batch becomes a loss:
``Task``, ``Classification``), ``step`` (one training step), ``graphs`` (the whole step in a
CUDA graph: ``CUDAGraphStep``), ``checkpoint`` (training
checkpoints), ``outputs`` (output directories and resume), ``guards`` (the finite-step check,
signals), ``progress`` (progress bar, metrics file), ``distributed``,
``evaluate``, ``build`` (data and models of a run), ``hyperrule`` (BiT-HyperRule),
``schedules`` (upstream schedules), ``mixup``, ``metrics``, ``losses`` (distillation),
``ridge`` (k-shot subsets, features, closed-form ridge heads), ``plots``.

The recipes, thin over the library, in ``bitfast.train.recipes``: ``finetune``, ``pretrain``,
``distill``, ``fewshot``, ``story``. (The earlier module paths ``bitfast.train.finetune``,
``.pretrain``, ``.distillation``, ``.transfer``, ``.story``, ``.distill``, ``.fewshot`` and
``.sampling`` (now ``bitfast.data.sampling``) still import, with a DeprecationWarning.)
"""

# ``mixup`` stays the module (``bitfast.train.mixup.mixup`` is the function), so that
# ``import bitfast.train.mixup`` and ``from bitfast.train import mixup`` agree.
from bitfast.train import hyperrule, metrics, mixup, ridge, schedules
from bitfast.train.losses import distill_loss
from bitfast.train.metrics import (
    confusion_matrix,
    ensemble_logits,
    expected_calibration_error,
    reliability_bins,
    topk_accuracy,
    topk_correct,
)
from bitfast.train.mixup import soft_cross_entropy
from bitfast.train.ridge import (
    extract_features,
    kshot_indices,
    ridge_head,
    ridge_predict,
    run_ridge_episodes,
    select_lambda,
)
from bitfast.train.schedules import cosine_lr, scaled_lr, upstream_step_lr

__all__ = [
    "confusion_matrix",
    "cosine_lr",
    "distill_loss",
    "ensemble_logits",
    "expected_calibration_error",
    "extract_features",
    "hyperrule",
    "kshot_indices",
    "metrics",
    "mixup",
    "reliability_bins",
    "ridge",
    "ridge_head",
    "ridge_predict",
    "run_ridge_episodes",
    "scaled_lr",
    "schedules",
    "select_lambda",
    "soft_cross_entropy",
    "topk_accuracy",
    "topk_correct",
    "upstream_step_lr",
]

# The loop and the recipes, last: they build on everything above. ``finetune`` and
# ``pretrain`` here are the recipes' functions.
from bitfast.train.config import TrainConfig  # noqa: E402
from bitfast.train.graphs import CUDAGraphStep  # noqa: E402
from bitfast.train.guards import NonFiniteLossError  # noqa: E402
from bitfast.train.loop import train_loop  # noqa: E402
from bitfast.train.recipes.fewshot import FewshotConfig  # noqa: E402
from bitfast.train.recipes.finetune import FinetuneConfig, finetune  # noqa: E402
from bitfast.train.recipes.pretrain import PretrainConfig, pretrain  # noqa: E402
from bitfast.train.recipes.story import StoryConfig  # noqa: E402
from bitfast.train.task import Classification, Task  # noqa: E402

__all__ += [
    "CUDAGraphStep",
    "Classification",
    "FewshotConfig",
    "FinetuneConfig",
    "NonFiniteLossError",
    "PretrainConfig",
    "StoryConfig",
    "Task",
    "TrainConfig",
    "finetune",
    "pretrain",
    "train_loop",
]


def __getattr__(name: str):
    # ``bitfast.train.fewshot`` was the ridge module: the deprecated path still resolves.
    if name == "fewshot":
        import importlib

        return importlib.import_module("bitfast.train.fewshot")
    raise AttributeError(f"module 'bitfast.train' has no attribute {name!r}")
