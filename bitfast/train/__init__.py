"""Training building blocks: BiT-HyperRule, upstream schedules, MixUp, metrics, few-shot heads.

Plain functions, importable without the training loops:
``hyperrule`` (the fine-tuning rule), ``schedules`` (upstream step and cosine schedules),
``mixup``, ``metrics`` (top-k, ECE, confusion matrix, ensembling) and ``fewshot`` (k-shot
subsets, feature extraction, closed-form ridge heads).
"""

from bitfast.train import hyperrule, schedules
from bitfast.train.schedules import cosine_lr, scaled_lr, upstream_step_lr

__all__ = [
    "cosine_lr",
    "hyperrule",
    "scaled_lr",
    "schedules",
    "upstream_step_lr",
]
