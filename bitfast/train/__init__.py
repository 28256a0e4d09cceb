"""Training building blocks: BiT-HyperRule, upstream schedules, MixUp, metrics, few-shot heads.

Plain functions, importable without the training loops:
``hyperrule`` (the fine-tuning rule), ``schedules`` (upstream step and cosine schedules),
``mixup``, ``metrics`` (top-k, ECE, confusion matrix, ensembling) and ``fewshot`` (k-shot
subsets, feature extraction, closed-form ridge heads).
"""

# ``mixup`` stays the module (``bitfast.train.mixup.mixup`` is the function), so that
# ``import bitfast.train.mixup`` and ``from bitfast.train import mixup`` agree.
from bitfast.train import fewshot, hyperrule, metrics, mixup, schedules
from bitfast.train.distill import distill_loss
from bitfast.train.fewshot import (
    extract_features,
    kshot_indices,
    ridge_head,
    ridge_predict,
    run_ridge_episodes,
    select_lambda,
)
from bitfast.train.metrics import (
    confusion_matrix,
    ensemble_logits,
    expected_calibration_error,
    reliability_bins,
    topk_accuracy,
    topk_correct,
)
from bitfast.train.mixup import soft_cross_entropy
from bitfast.train.schedules import cosine_lr, scaled_lr, upstream_step_lr

__all__ = [
    "confusion_matrix",
    "cosine_lr",
    "distill_loss",
    "ensemble_logits",
    "expected_calibration_error",
    "extract_features",
    "fewshot",
    "hyperrule",
    "kshot_indices",
    "metrics",
    "mixup",
    "reliability_bins",
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

# The training procedures (bitfast/train/{loop,finetune,pretrain,transfer,story}.py), last:
# they build on everything above. ``finetune`` and ``pretrain`` are the functions (their
# modules stay importable as ``bitfast.train.finetune`` / ``.pretrain`` via ``from ... import``).
from bitfast.train.config import TrainConfig  # noqa: E402
from bitfast.train.finetune import FinetuneConfig, finetune  # noqa: E402
from bitfast.train.guards import NonFiniteLossError  # noqa: E402
from bitfast.train.loop import train_loop  # noqa: E402
from bitfast.train.pretrain import PretrainConfig, pretrain  # noqa: E402
from bitfast.train.story import StoryConfig  # noqa: E402
from bitfast.train.transfer import FewshotConfig  # noqa: E402

__all__ += [
    "FewshotConfig",
    "FinetuneConfig",
    "NonFiniteLossError",
    "PretrainConfig",
    "StoryConfig",
    "TrainConfig",
    "finetune",
    "pretrain",
    "train_loop",
]
