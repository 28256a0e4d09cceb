"""The training modules moved (the recipes to bitfast.train.recipes, the distillation loss to
losses, the ridge maths to ridge): every earlier import path still works, with a
DeprecationWarning, and gives the same objects."""

import importlib
import sys

import pytest

import bitfast.train as train

MOVED = {
    "finetune": ("recipes.finetune", "FinetuneConfig"),
    "pretrain": ("recipes.pretrain", "PretrainConfig"),
    "distillation": ("recipes.distill", "DistillConfig"),
    "transfer": ("recipes.fewshot", "FewshotConfig"),
    "story": ("recipes.story", "StoryConfig"),
    "distill": ("losses", "distill_loss"),
    "fewshot": ("ridge", "ridge_head"),
    "sampling": ("bitfast.data.sampling", "StepSampler"),
}


def _full(new: str) -> str:
    return new if new.startswith("bitfast.") else f"bitfast.train.{new}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_paths_warn_and_resolve(old):
    new, name = MOVED[old]
    saved = {k: getattr(train, k) for k in ("finetune", "pretrain") if hasattr(train, k)}
    sys.modules.pop(f"bitfast.train.{old}", None)
    try:
        with pytest.warns(DeprecationWarning, match=f"bitfast.train.{old} moved to {_full(new)}"):
            module = importlib.import_module(f"bitfast.train.{old}")
        assert getattr(module, name) is getattr(importlib.import_module(_full(new)), name)
    finally:
        # Importing a submodule sets the package attribute of its name; keep the functions.
        for k, v in saved.items():
            setattr(train, k, v)


def test_the_package_exports_the_recipes_functions():
    from bitfast.train.recipes.finetune import finetune
    from bitfast.train.recipes.pretrain import pretrain

    assert train.finetune is finetune and train.pretrain is pretrain
