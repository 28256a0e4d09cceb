"""The BiT story on the embedded digits (``bitfast story``, the README's main command).

Big Transfer in miniature, on a 2-core CPU in minutes, with no download:

1. upstream: supervised training of a small BiT ResNet-v2 (``bit_tiny``: units (1, 1, 1, 1),
   stem width 32, GroupNorm + weight-standardized convs, bitfast's fused ops; 2M parameters)
   on the digits 0-4 with the upstream recipe (SGD momentum 0.9, lr x batch/256, weight
   decay 1e-4, cosine decay after a 10% warm-up);
2. transfer to the digits 5-9, which the upstream network never saw:
   * few-shot: ridge-regression heads on the frozen upstream features, 1, 5 and 10 examples
     per class, several seeds (mean and std), and on all training images;
   * fine-tuning with the BiT-HyperRule recipe (fresh zero-initialised head, SGD momentum
     0.9, no weight decay, linear warm-up then three tenfold decays), its schedule scaled down
     for 700 images of 32x32 on a CPU;
   * the same architecture trained from scratch on 5-9 with the same budget (steps x batch)
     and the upstream recipe, for comparison;
   * the same two with only 10 images per class (several seeds).

It prints a table, writes plots and metrics into the output directory, and fails (exit 1)
when the fine-tuned accuracy on 5-9 is below ``min_accuracy``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bitfast.train import plots
from bitfast.train.build import TINY_MODEL, build_data, build_model, summary_table
from bitfast.train.config import TrainConfig
from bitfast.train.distributed import DistInfo
from bitfast.train.evaluate import evaluate
from bitfast.train.loop import train_loop
from bitfast.train.recipes.fewshot import backbone_features, plain_train
from bitfast.train.recipes.finetune import FinetuneConfig, step_lr

__all__ = ["StoryConfig", "story"]


@dataclass
class StoryConfig:
    """The story's knobs (defaults: the README's run, about a minute on 2 CPU cores).

    ``upstream_steps`` at ``batch_size`` on digits 0-4 with peak lr ``upstream_lr`` (cosine);
    ``finetune_schedule`` = [warmup, d1, d2, d3, total] steps on digits 5-9 with peak lr
    ``finetune_lr``; the from-scratch baseline gets ``finetune_schedule[-1]`` steps too.
    Then ``fewshot_k`` images per class (one subset per ``fewshot_seeds`` seed): fine-tuning
    (``fewshot_schedule``, the whole subset in each batch) against training from scratch.
    ``smoke``: a seconds-long configuration (tests), without the accuracy check.
    """

    output: str = "runs/story"
    upstream_classes: Sequence[int] = (0, 1, 2, 3, 4)
    downstream_classes: Sequence[int] = (5, 6, 7, 8, 9)
    crop: int = 32
    resize: int = 36
    batch_size: int = 64
    upstream_steps: int = 300
    upstream_lr: float = 0.025
    finetune_schedule: Sequence[int] = (6, 30, 45, 54, 60)
    finetune_lr: float = 0.03
    scratch_lr: float = 0.025
    shots: Sequence[int] = (1, 5, 10)
    seeds: Sequence[int] = (0, 1, 2, 3, 4)
    fewshot_k: int = 10
    fewshot_schedule: Sequence[int] = (3, 15, 22, 27, 30)
    fewshot_seeds: Sequence[int] = (0, 1, 2)
    min_accuracy: float = 0.95
    seed: int = 0
    device: str | None = None
    progress: bool = True
    plots: bool = True
    smoke: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.smoke:
            self.apply_smoke()

    def apply_smoke(self) -> None:
        """Shrink to a seconds-long run (a few steps per phase, no accuracy check)."""
        self.upstream_steps, self.finetune_schedule = 3, (1, 2, 2, 2, 3)
        self.batch_size, self.seeds, self.min_accuracy = 16, (0, 1), 0.0
        self.fewshot_k, self.fewshot_schedule, self.fewshot_seeds = 2, (1, 1, 1, 1, 2), (0,)


def _train_cfg(story_cfg: StoryConfig, output: str, classes, **kw) -> TrainConfig:
    values = dict(data="digits", classes=list(classes), model=TINY_MODEL, crop=story_cfg.crop, resize=story_cfg.resize,
                  flip=False, batch_size=story_cfg.batch_size, seed=story_cfg.seed, output=output,
                  progress=story_cfg.progress, plots=False, device=story_cfg.device, eval_every=0,
                  overwrite=True)  # the story replaces its own earlier runs
    return TrainConfig(**{**values, **kw})


def story(cfg: StoryConfig, stream=None) -> dict:
    """Run the story; print the table; write ``story.json``, ``metrics.jsonl`` files and plots
    under ``cfg.output``. Returns a dict with every number printed and ``passed`` (the
    fine-tuned accuracy reached ``cfg.min_accuracy``)."""
    stream = stream or sys.stdout
    t_all = time.perf_counter()
    device = torch.device(cfg.device or "cpu")
    info = DistInfo(device=device)
    out = cfg.output
    os.makedirs(out, exist_ok=True)

    def say(msg: str = "") -> None:
        print(msg, file=stream, flush=True)

    # 1. Upstream: the upstream recipe (lr x batch/256, weight decay 1e-4) with cosine decay.
    up_cfg = _train_cfg(cfg, os.path.join(out, "upstream"), cfg.upstream_classes, weight_decay=1e-4, freeze_bn=False)
    torch.manual_seed(cfg.seed)
    up_data = build_data(up_cfg, cfg.resize, cfg.crop)
    model, _ = build_model(up_cfg, up_data.num_classes, zero_head=False)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"bitfast story: Big Transfer on the embedded UCI digits, on {device} ({torch.get_num_threads()} threads)")
    say(f"  network: BiT ResNet-v2 '{TINY_MODEL}' (units 1-1-1-1, stem width 32, GroupNorm + weight-standardized convs, "
        f"bitfast fused ops), {n_params / 1e6:.2f}M parameters, {cfg.crop}x{cfg.crop} inputs")
    from bitfast.train.schedules import cosine_lr

    up_total = cfg.upstream_steps
    say(f"[1/5] upstream: digits {list(cfg.upstream_classes)} ({len(up_data.train)} training images), {up_total} steps "
        f"x {cfg.batch_size}, SGD momentum 0.9, peak lr {cfg.upstream_lr:g}, cosine with 10% warm-up, weight decay 1e-4")
    t0 = time.perf_counter()
    up = train_loop(model, up_data.train, cfg=up_cfg, total_steps=up_total,
                    lr_at=lambda s: cosine_lr(s, up_total, cfg.upstream_lr), num_classes=up_data.num_classes, info=info,
                    desc="upstream", run_meta={"model": TINY_MODEL, "classes": up_data.class_names, "resolution": cfg.crop})
    up_eval = evaluate(up["model"], up_data.eval, up_data.num_classes, info=info)
    t_up = time.perf_counter() - t0
    say(f"      upstream test top-1 on digits {list(cfg.upstream_classes)}: {100 * up_eval['top1']:.1f}% ({t_up:.0f} s)")
    upstream_model = up["model"]
    upstream_ckpt = up["checkpoint"]

    # 2. Few-shot ridge heads on the frozen upstream features of digits 5-9.
    every = max(1, cfg.finetune_schedule[-1] // 6)  # test accuracy 6 times along the way, for the curves
    down_cfg = _train_cfg(cfg, os.path.join(out, "finetune"), cfg.downstream_classes, eval_every=every)
    down = build_data(down_cfg, cfg.resize, cfg.crop)
    say(f"[2/5] few-shot transfer to digits {list(cfg.downstream_classes)}: ridge heads on frozen upstream features, "
        f"{list(cfg.shots)} shots x {len(cfg.seeds)} seeds")
    t0 = time.perf_counter()
    from bitfast.train.ridge import ridge_head, ridge_predict, run_ridge_episodes, select_lambda

    ztr, ytr = backbone_features(upstream_model, plain_train(down_cfg, cfg.crop, down), device=device)
    zte, yte = backbone_features(upstream_model, down.eval, device=device)
    ridge = run_ridge_episodes(ztr, ytr, zte, yte, shots=list(cfg.shots), seeds=list(cfg.seeds))
    lam = select_lambda(ztr, ytr, seed=cfg.seed)
    w, b = ridge_head(ztr, ytr, lam)
    ridge_all = float((ridge_predict(zte, w, b).argmax(1) == yte).double().mean())
    t_ridge = time.perf_counter() - t0
    for k, r in ridge.items():
        say(f"      {k:>2}-shot: {100 * r['mean']:.1f}% +- {100 * r['std']:.1f}")
    say(f"      all {len(ytr)} images: {100 * ridge_all:.1f}% ({t_ridge:.1f} s)")

    # 3. HyperRule-style fine-tuning from the upstream weights.
    sched = [int(v) for v in cfg.finetune_schedule]
    steps = sched[-1]
    ft_cfg = FinetuneConfig(**{**down_cfg.__dict__,
                               "pretrained": upstream_ckpt, "schedule": sched, "mixup_alpha": 0.0})
    torch.manual_seed(cfg.seed)
    ft_model, _ = build_model(ft_cfg, down.num_classes, zero_head=True)
    say(f"[3/5] HyperRule fine-tuning on digits {list(cfg.downstream_classes)} ({len(down.train)} images): fresh "
        f"zero-initialised head, SGD momentum 0.9, no weight decay, no MixUp (n < 20k), warm-up then lr/10 at "
        f"steps {sched[1:4]}")
    say(f"      scaled down for the tiny data: schedule {sched} at batch {cfg.batch_size} and peak lr {cfg.finetune_lr:g} "
        f"(the rule's [100, 200, 300, 400, 500] at batch 512, lr 0.003, is sized for GPUs and large networks)")
    t0 = time.perf_counter()
    ft = train_loop(ft_model, down.train, cfg=ft_cfg, total_steps=steps, lr_at=lambda s: step_lr(s, sched, cfg.finetune_lr),
                    num_classes=down.num_classes, info=info, desc="finetune",
                    eval_fn=_eval_every(down, info), run_meta={"model": TINY_MODEL, "classes": down.class_names,
                                                             "resolution": cfg.crop})
    ft_eval = evaluate(ft["model"], down.eval, down.num_classes, info=info)
    t_ft = time.perf_counter() - t0
    say(f"      fine-tuned test top-1: {100 * ft_eval['top1']:.1f}% ({t_ft:.0f} s)")
    # Deployment: the fine-tuned model exported (weight standardization folded into plain convs)
    # with int8 weights (one scale per output channel), evaluated on the same test images.
    from bitfast.compress import quantize_int8
    from bitfast.export import for_inference

    t0 = time.perf_counter()
    int8_model = for_inference(ft["model"])
    q_report = quantize_int8(int8_model)
    int8_eval = evaluate(int8_model, down.eval, down.num_classes, info=info)
    t_q = time.perf_counter() - t0
    say(f"      exported with int8 weights ({q_report.model_bytes_before / 2**20:.1f} -> "
        f"{q_report.model_bytes_after / 2**20:.1f} MiB): test top-1 {100 * int8_eval['top1']:.1f}% "
        f"(float {100 * ft_eval['top1']:.1f}%)")

    # 4. The same network from scratch, same steps and batch, with the upstream recipe.
    sc_cfg = _train_cfg(cfg, os.path.join(out, "scratch"), cfg.downstream_classes, weight_decay=1e-4, freeze_bn=False,
                        eval_every=every)
    torch.manual_seed(cfg.seed)
    sc_model, _ = build_model(sc_cfg, down.num_classes, zero_head=False)
    say(f"[4/5] from scratch on digits {list(cfg.downstream_classes)}: the same network and budget ({steps} steps x "
        f"{cfg.batch_size}), upstream recipe (peak lr {cfg.scratch_lr:g}, cosine, weight decay 1e-4)")
    t0 = time.perf_counter()
    sc = train_loop(sc_model, down.train, cfg=sc_cfg, total_steps=steps, lr_at=lambda s: cosine_lr(s, steps, cfg.scratch_lr),
                    num_classes=down.num_classes, info=info, desc="scratch", eval_fn=_eval_every(down, info),
                    run_meta={"model": TINY_MODEL, "classes": down.class_names, "resolution": cfg.crop})
    sc_eval = evaluate(sc["model"], down.eval, down.num_classes, info=info)
    t_sc = time.perf_counter() - t0
    say(f"      from-scratch test top-1: {100 * sc_eval['top1']:.1f}% ({t_sc:.0f} s)")

    # 5. Few-shot: fine-tuning vs from scratch on k images per class, same steps.
    k = cfg.fewshot_k
    fs_sched = [int(v) for v in cfg.fewshot_schedule]
    say(f"[5/5] {k} images per class ({k * down.num_classes} images, seeds {list(cfg.fewshot_seeds)}): HyperRule-style "
        f"fine-tuning (schedule {fs_sched}, peak lr {cfg.finetune_lr:g}) vs from scratch ({fs_sched[-1]} steps, cosine, "
        f"peak lr {cfg.scratch_lr:g}); every batch is the whole subset")
    from bitfast.train.ridge import kshot_indices

    t0 = time.perf_counter()
    fs_acc: dict[str, list[float]] = {"finetune": [], "scratch": []}
    for seed in cfg.fewshot_seeds:
        subset = torch.utils.data.Subset(down.train, kshot_indices(torch.as_tensor(down.train.targets), k, seed).tolist())
        for method in ("finetune", "scratch"):
            run_cfg = _train_cfg(cfg, os.path.join(out, f"{k}shot-{method}-seed{seed}"), cfg.downstream_classes,
                                 batch_size=len(subset), progress=False,
                                 **({"pretrained": upstream_ckpt} if method == "finetune" else
                                    {"weight_decay": 1e-4, "freeze_bn": False}))
            run_cfg.seed = seed
            torch.manual_seed(seed)
            m, _ = build_model(run_cfg, down.num_classes, zero_head=method == "finetune")
            lr_at = ((lambda s: step_lr(s, fs_sched, cfg.finetune_lr)) if method == "finetune"
                     else (lambda s: cosine_lr(s, fs_sched[-1], cfg.scratch_lr)))
            r = train_loop(m, subset, cfg=run_cfg, total_steps=fs_sched[-1], lr_at=lr_at, num_classes=down.num_classes,
                           info=info, desc=f"{k}-shot {method}", run_meta={"model": TINY_MODEL, "classes": down.class_names})
            fs_acc[method].append(evaluate(r["model"], down.eval, down.num_classes, info=info)["top1"])
    t_fs = time.perf_counter() - t0
    fs_stats = {m: (float(torch.tensor(a).mean()), float(torch.tensor(a).std()) if len(a) > 1 else 0.0)
                for m, a in fs_acc.items()}
    say(f"      {k}-shot fine-tuned {100 * fs_stats['finetune'][0]:.1f}% +- {100 * fs_stats['finetune'][1]:.1f}, from scratch "
        f"{100 * fs_stats['scratch'][0]:.1f}% +- {100 * fs_stats['scratch'][1]:.1f} ({t_fs:.0f} s)")

    total = time.perf_counter() - t_all
    n_test = ft_eval["n"]
    rows = [[f"ridge head, frozen upstream features, {k}-shot", f"{k * down.num_classes}",
             f"{100 * r['mean']:.1f}% +- {100 * r['std']:.1f} ({len(r['accuracies'])} seeds)", "-"] for k, r in ridge.items()]
    rows.append(["ridge head, frozen upstream features, all", str(len(ytr)), f"{100 * ridge_all:.1f}%", f"{t_ridge:.0f} s"])
    rows.append([f"HyperRule fine-tuning from upstream ({steps} steps)", str(len(down.train)),
                 f"{100 * ft_eval['top1']:.1f}% (ECE {100 * ft_eval['ece']:.1f}%)", f"{t_ft:.0f} s"])
    rows.append([f"  the same, exported with int8 weights ({q_report.compression:.1f}x smaller)", str(len(down.train)),
                 f"{100 * int8_eval['top1']:.1f}% (float {100 * ft_eval['top1']:.1f}%)", f"{t_q:.0f} s"])
    rows.append([f"same network from scratch ({steps} steps)", str(len(down.train)),
                 f"{100 * sc_eval['top1']:.1f}% (ECE {100 * sc_eval['ece']:.1f}%)", f"{t_sc:.0f} s"])
    n_seeds = len(cfg.fewshot_seeds)
    rows.append([f"HyperRule fine-tuning from upstream, {k}-shot ({fs_sched[-1]} steps)", str(k * down.num_classes),
                 f"{100 * fs_stats['finetune'][0]:.1f}% +- {100 * fs_stats['finetune'][1]:.1f} ({n_seeds} seeds)",
                 f"{t_fs:.0f} s (both)"])
    rows.append([f"same network from scratch, {k}-shot ({fs_sched[-1]} steps)", str(k * down.num_classes),
                 f"{100 * fs_stats['scratch'][0]:.1f}% +- {100 * fs_stats['scratch'][1]:.1f} ({n_seeds} seeds)", "-"])
    passed = ft_eval["top1"] >= cfg.min_accuracy
    say("")
    say(f"upstream on digits {list(cfg.upstream_classes)}: {100 * up_eval['top1']:.1f}% test top-1 after {up_total} steps "
        f"({t_up:.0f} s). Transfer to digits {list(cfg.downstream_classes)} ({n_test} test images):")
    say(summary_table(rows, ["method (digits 5-9)", "training images", "test top-1", "time"]))

    written = []
    if cfg.plots:
        if plots.available():
            written += plots.plot_curves(up["history"], out, prefix="upstream_")
            written += plots.plot_curves(ft["history"], out, prefix="finetune_")
            written += plots.plot_story({"fine-tuned from upstream": ft["history"], "from scratch": sc["history"]},
                                        {k: (r["mean"], r["std"]) for k, r in ridge.items()}, out)
            written.append(plots.plot_reliability(ft_eval["reliability"], os.path.join(out, "reliability.png"),
                                                  title="fine-tuned, digits 5-9", ece=ft_eval["ece"]))
            written.append(plots.plot_confusion(ft_eval["confusion"], os.path.join(out, "confusion.png"), down.class_names))
        else:
            say(plots.missing_note())
    report = {
        "upstream": {"top1": up_eval["top1"], "steps": up_total, "seconds": t_up},
        "ridge": {str(k): {"mean": r["mean"], "std": r["std"], "accuracies": r["accuracies"]} for k, r in ridge.items()},
        "ridge_all": ridge_all,
        "finetune": {"top1": ft_eval["top1"], "top5": ft_eval["top5"], "ece": ft_eval["ece"], "steps": steps,
                     "schedule": sched, "lr": cfg.finetune_lr, "seconds": t_ft,
                     "int8_top1": int8_eval["top1"], "float_bytes": q_report.model_bytes_before,
                     "int8_bytes": q_report.model_bytes_after},
        "scratch": {"top1": sc_eval["top1"], "ece": sc_eval["ece"], "steps": steps, "seconds": t_sc},
        "fewshot_finetune": {"k": k, "accuracies": fs_acc["finetune"], "mean": fs_stats["finetune"][0],
                             "std": fs_stats["finetune"][1]},
        "fewshot_scratch": {"k": k, "accuracies": fs_acc["scratch"], "mean": fs_stats["scratch"][0],
                            "std": fs_stats["scratch"][1]},
        "seconds": total, "min_accuracy": cfg.min_accuracy, "passed": passed, "smoke": cfg.smoke,
    }
    with open(os.path.join(out, "story.json"), "w") as f:
        json.dump(report, f, indent=1)
    shots = f"{cfg.fewshot_k}shot-{{finetune,scratch}}-seed{{{','.join(str(s) for s in cfg.fewshot_seeds)}}}/"
    say(f"wrote {out}/: story.json, upstream/ finetune/ scratch/ {shots} (checkpoints, metrics.jsonl)"
        + (", plots: " + ", ".join(os.path.basename(p) for p in written if p) if written else ""))
    verdict = "PASS" if passed else "FAIL"
    say(f"{verdict}: fine-tuned accuracy on digits {list(cfg.downstream_classes)} {100 * ft_eval['top1']:.1f}% "
        f"(target >= {100 * cfg.min_accuracy:.0f}%); total time {total:.0f} s")
    return report


def _eval_every(data, info: DistInfo):
    def fn(net, step):
        from bitfast.train.loop import unwrap

        r = evaluate(unwrap(net), data.eval, data.num_classes, info=info)
        return {k: r[k] for k in ("top1", "top5", "loss", "ece")}

    return fn
