"""Few-shot transfer (``bitfast fewshot``): k-shot episodes on frozen features and with
HyperRule fine-tuning.

Kolesnikov et al., 2020, "Big Transfer (BiT)", section 4.2 (few-shot): for each k (examples
per class) and each seed, a balanced k-shot subset of the training set; two methods:

* ``ridge``: the backbone is frozen, its pooled pre-logit features ``Z`` feed a closed-form
  ridge-regression head ``(Z^T Z + lambda I)^-1 Z^T Y`` with lambda chosen on a held-out part
  of the subset (``bitfast.train.ridge``);
* ``finetune``: the whole network is fine-tuned on the subset with BiT-HyperRule
  (n = k x classes examples: the small-data schedule), from the same initialisation.

Accuracy is measured on the full test set; the mean and standard deviation across seeds are
reported per k.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from bitfast.train.build import Data, build_data, build_model, model_from_checkpoint, summary_table
from bitfast.train.config import TrainConfig
from bitfast.train.distributed import DistInfo, init_distributed
from bitfast.train.evaluate import evaluate
from bitfast.train.loop import train_loop
from bitfast.train.options import Options
from bitfast.train.outputs import start_run
from bitfast.train.recipes.finetune import FinetuneConfig, plan_finetune, step_lr

__all__ = ["FewshotConfig", "backbone_features", "fewshot", "finetune_episode", "format_fewshot", "plain_train"]

METHODS = ("ridge", "finetune")


@dataclass
class FewshotConfig(FinetuneConfig):
    """``FinetuneConfig`` (used by the fine-tuning episodes) plus the few-shot protocol.

    The backbone comes from ``checkpoint`` (a bitfast training checkpoint: its model and
    resolution) or from ``model`` + ``pretrained`` (released weights). ``shots``: examples per
    class; ``seeds``: one episode each; ``methods``: ``ridge`` and/or ``finetune``.
    """

    checkpoint: str | None = None
    shots: Sequence[int] = (1, 5, 10)
    seeds: Sequence[int] = (0, 1, 2)
    methods: Sequence[str] = ("ridge",)
    feature_batch_size: int = 256
    output: str = "runs/fewshot"
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        """``FinetuneConfig.validate`` plus the few-shot protocol's options."""
        super().validate()
        v = Options(self)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"--methods must be some of {list(METHODS)}; got {list(self.methods)}")
        v.integers("shots", low=1, unique=True)
        v.integers("seeds", low=0, unique=True)
        v.number("feature_batch_size", low=1, integer=True)
        if self.checkpoint is not None and not os.path.isfile(self.checkpoint):
            raise FileNotFoundError(f"--checkpoint {self.checkpoint!r}: no such file (a bitfast training checkpoint)")


def backbone_features(model: nn.Module, dataset, *, batch_size: int = 256, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled pre-logit features of ``dataset`` under the frozen ``model``: ``(Z (N, D), y (N,))``."""
    from bitfast.data.sampling import collate
    from bitfast.train.ridge import extract_features

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return extract_features(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), loader,
                                    device=device)
    finally:
        model.train(was)


def plain_train(cfg: TrainConfig, crop: int, data: Data):
    """The training images without augmentation (resized straight to ``crop``), for features."""
    if cfg.data in (None, "digits"):
        from bitfast.data.digits import DigitsDataset

        return DigitsDataset(classes=data.train.classes, split="train", resolution=crop, seed=data.train.seed)
    from bitfast.data import ImageFolder, transforms

    return ImageFolder(data.train.root, transform=transforms.eval_transform(crop))


def finetune_episode(init: nn.Module, train_subset, data: Data, cfg: FewshotConfig, *, k: int, seed: int,
                     info: DistInfo, output: str) -> dict:
    """HyperRule fine-tuning of a copy of ``init`` (fresh zero head) on ``train_subset`` (an
    episode of ``k`` shots); returns the test metrics, with ``stopped_early`` (the steps done
    and planned) when ``--stop-at-step`` ended it before its schedule."""
    import copy

    model = copy.deepcopy(init)
    model.reset_classifier(data.num_classes, zero_head=True)
    n = len(train_subset)
    plan = plan_finetune(cfg, n, None)
    sched, peak = plan["schedule"], plan["peak_lr"]
    ep_cfg = copy.copy(cfg)
    ep_cfg.output, ep_cfg.seed, ep_cfg.mixup_alpha = output, seed, plan["mixup_alpha"]
    # Episodes are the fewshot command's own sub-runs: replaced on a new run, continued with --resume auto.
    ep_cfg.resume, ep_cfg.overwrite = ("auto" if cfg.resume == "auto" else None), True
    ep_cfg.checkpoint_every, ep_cfg.eval_every, ep_cfg.plots = 0, 0, False
    res = train_loop(model, train_subset, cfg=ep_cfg, total_steps=sched[-1], lr_at=lambda s: step_lr(s, sched, peak),
                     num_classes=data.num_classes, info=info, desc=f"finetune {k}-shot seed {seed}",
                     run_meta={"model": cfg.model, "classes": data.class_names})
    metrics = evaluate(res["model"], data.eval, data.num_classes, batch_size=cfg.feature_batch_size, info=info)
    if res["stopped_early"]:
        metrics["stopped_early"] = {"step": res["step"], "total_steps": res["total_steps"]}
    return metrics


def _stats(accs: list[float]) -> dict:
    t = torch.tensor(accs, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=True)) if len(accs) > 1 else 0.0, "accuracies": accs}


def format_fewshot(results: dict) -> str:
    """The results table: method, shots, mean and std of top-1 over the episodes."""
    rows = []
    for method, per_k in results.items():
        for k, r in sorted(per_k.items()):
            rows.append([method, k, f"{100 * r['mean']:.1f}%", f"{100 * r['std']:.1f}", len(r["accuracies"])])
    return summary_table(rows, ["method", "shots/class", "test top-1 (mean)", "std", "episodes"])


def fewshot(cfg: FewshotConfig, info: DistInfo | None = None, stream=None) -> dict:
    """Run the few-shot protocol of ``cfg``; print the table; write ``fewshot.json`` into
    ``cfg.output``. Returns ``{method: {k: {"mean", "std", "accuracies"}}}``."""
    stream = stream or sys.stdout
    start_run(cfg, files=("fewshot.json",))
    info = info or init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        init, state = model_from_checkpoint(cfg.checkpoint, device="cpu", trusted=cfg.trust_checkpoint)
        cfg.model = state.get("config", {}).get("model", cfg.model)
        crop = cfg.crop or int(state.get("resolution") or 128)
        source = f"the backbone of {cfg.checkpoint}"
    else:
        init, source = build_model(cfg, 1)
        crop = cfg.crop or 128
    resize = cfg.resize or max(crop, round(crop * 1.25))
    data = build_data(cfg, resize, crop)
    if data.eval is None:
        raise ValueError("few-shot evaluation needs a test set: pass --val-data or an ImageFolder with a val/ folder")
    init = init.to(info.device)
    if info.is_main:
        print(f"bitfast fewshot: {cfg.model} ({source}) on {data.description}; shots {list(cfg.shots)}, "
              f"seeds {list(cfg.seeds)}, methods {list(cfg.methods)}", file=stream)
    from bitfast.train.ridge import kshot_indices, run_ridge_episodes

    results: dict = {}
    targets = torch.as_tensor(data.train.targets)
    if "ridge" in cfg.methods:
        ztr, ytr = backbone_features(init, plain_train(cfg, crop, data), batch_size=cfg.feature_batch_size, device=info.device)
        zte, yte = backbone_features(init, data.eval, batch_size=cfg.feature_batch_size, device=info.device)
        ridge = run_ridge_episodes(ztr, ytr, zte, yte, shots=[int(k) for k in cfg.shots], seeds=[int(s) for s in cfg.seeds])
        results["ridge"] = {k: {"mean": r["mean"], "std": r["std"], "accuracies": r["accuracies"]} for k, r in ridge.items()}
    stopped = []
    if "finetune" in cfg.methods:
        per_k = {}
        for k in cfg.shots:
            accs = []
            for seed in cfg.seeds:
                idx = kshot_indices(targets, int(k), int(seed)).tolist()
                out = os.path.join(cfg.output, f"finetune-{k}shot-seed{seed}")
                res = finetune_episode(init, torch.utils.data.Subset(data.train, idx), data, cfg, k=int(k),
                                       seed=int(seed), info=info, output=out)
                accs.append(res["top1"])
                if "stopped_early" in res:
                    stopped.append((out, res["stopped_early"]))
            per_k[int(k)] = _stats(accs)
        results["finetune"] = per_k
    if info.is_main:
        os.makedirs(cfg.output, exist_ok=True)
        with open(os.path.join(cfg.output, "fewshot.json"), "w") as f:
            record = {m: {str(k): v for k, v in r.items()} for m, r in results.items()}
            if stopped:
                record["stopped_early"] = {path: s for path, s in stopped}
            json.dump(record, f, indent=1)
        print(format_fewshot(results), file=stream)
        if stopped:
            step, total = stopped[0][1]["step"], stopped[0][1]["total_steps"]
            print(f"note: the fine-tuning episodes stopped early (--stop-at-step: step {step} of {total}); their "
                  "accuracies are of unfinished runs. Continue them with the same command and --resume auto.",
                  file=stream)
    return results
