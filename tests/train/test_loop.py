"""The shared training loop: exact resume, NaN stop, micro-batching, data order, frozen BN,
linear probe, low precision, evaluation sums, the HyperRule step schedule."""

import json
import os

import pytest
import torch

from bitfast.data.sampling import StepSampler
from bitfast.models import ResNetV2
from bitfast.train import hyperrule
from bitfast.train.build import check_resolution
from bitfast.train.checkpoint import load_checkpoint
from bitfast.train.config import TrainConfig
from bitfast.train.distributed import check_batch
from bitfast.train.evaluate import EvalSums
from bitfast.train.guards import NonFiniteLossError
from bitfast.train.loop import train_loop
from bitfast.train.progress import MetricsLog, ProgressBar
from bitfast.train.recipes.finetune import FinetuneConfig, plan_finetune, step_lr

# One torch thread for every test here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(num_classes=3, norm="gn", seed=1):
    torch.manual_seed(seed)
    return ResNetV2((1, 1, 1, 1), base_width=32, num_classes=num_classes, norm=norm, zero_head=False)


class Noisy(torch.utils.data.Dataset):
    """Random 32x32 images whose items add fresh torch noise: the augmentation stand-in."""

    def __init__(self, n=24, num_classes=3, nan_at=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        if nan_at is not None:
            self.x[nan_at] = float("nan")

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(3, 32, 32), int(self.y[i])


def run(out, steps=4, **kw):
    cfg = TrainConfig(batch_size=8, output=str(out), model="bit_tiny", progress=False, **kw)
    lr = lambda s: 0.05 * (1 + s) / steps  # noqa: E731 - a step-dependent rate, so a resume must get it right
    return train_loop(tiny(norm=kw.pop("norm", "gn")), Noisy(), cfg=cfg, total_steps=steps, lr_at=lr, num_classes=3)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_after_interruption_is_bit_for_bit(tmp_path):
    full = run(tmp_path / "full", steps=4, mixup_alpha=0.4)
    part = run(tmp_path / "cut", steps=4, mixup_alpha=0.4, stop_at_step=2, log_every=1)
    assert part["step"] == 2 and load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 2
    resumed = run(tmp_path / "cut", steps=4, mixup_alpha=0.4, resume="auto", log_every=1)
    a, b = params(full["model"]), params(resumed["model"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in full["history"]][2:] == [r["loss"] for r in resumed["history"]]
    # The metrics file of the resumed run holds every step once (the later record wins).
    steps = [r["step"] for r in MetricsLog.read(str(tmp_path / "cut" / "metrics.jsonl")) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_resume_of_another_class_count_is_refused(tmp_path):
    run(tmp_path, steps=1)
    cfg = TrainConfig(batch_size=8, output=str(tmp_path), model="bit_tiny", progress=False, resume="auto")
    with pytest.raises(ValueError, match="3-class head, this run's data has 4 classes"):
        train_loop(tiny(4), Noisy(num_classes=4), cfg=cfg, total_steps=2, lr_at=lambda s: 0.01, num_classes=4)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_state(tmp_path):
    # Sample 19 is marked; the model's output turns NaN on the batch holding it (a forward
    # hook: bitfast's fused norm + ReLU maps NaN activations to 0, so NaN inputs would not do).
    cfg = TrainConfig(batch_size=8, output=str(tmp_path), model="bit_tiny", progress=False)
    ds = Noisy()
    ds.x[19, 0, 0, 0] = 1e4
    sampler = StepSampler(len(ds), 8, total_steps=4, seed=0)
    bad_step = next(s for s in range(4) if any(i == 19 for i, _ in sampler.batch(s))) + 1
    model = tiny()
    model.register_forward_hook(
        lambda m, inp, out: out + torch.where(inp[0][:, 0, 0, 0] > 1e3, float("nan"), 0.0)[:, None])
    with pytest.raises(NonFiniteLossError, match=f"loss is nan at step {bad_step} .*after step {bad_step - 1}"):
        train_loop(model, ds, cfg=cfg, total_steps=4, lr_at=lambda s: 0.01, num_classes=3)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_batch_split_matches_one_batch(tmp_path):
    one = run(tmp_path / "a", steps=1)
    split = run(tmp_path / "b", steps=1, batch_split=4)
    for (k, a), b in zip(params(one["model"]).items(), params(split["model"]).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="divisible by processes x --batch-split = 1 x 3"):
        run(tmp_path / "c", steps=1, batch_split=3)


def test_step_sampler_is_a_function_of_the_step():
    a = StepSampler(10, 4, total_steps=6, seed=3)
    batches = list(a)
    assert [len(b) for b in batches] == [4] * 6
    # Every epoch visits every sample once; the stream crosses epoch boundaries.
    flat = [i for b in batches for i, _ in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    resumed = StepSampler(10, 4, total_steps=6, start_step=4, seed=3)
    assert list(resumed) == batches[4:]
    # Two processes split each global batch in halves.
    r0 = StepSampler(10, 4, total_steps=6, rank=0, world_size=2, seed=3)
    r1 = StepSampler(10, 4, total_steps=6, rank=1, world_size=2, seed=3)
    assert [x + y for x, y in zip(r0, r1)] == batches
    assert len({s for b in batches for _, s in b}) == 24  # a distinct augmentation seed per draw


def test_batch_smaller_than_processes_is_a_clear_error():
    assert check_batch(8, 2) == 4
    with pytest.raises(ValueError, match="--batch-size 2 is smaller than the number of processes \\(4\\)"):
        check_batch(2, 4)


def test_frozen_batchnorm_statistics_and_linear_probe(tmp_path):
    cfg = TrainConfig(batch_size=8, output=str(tmp_path / "bn"), model="bit_tiny", progress=False, freeze_bn=True)
    model = tiny(norm="bn")
    # Frozen at their initial values (mean 0, var 1) the norms would not normalize and the
    # activations would overflow; as after pre-training, the statistics first describe the
    # data (one forward pass in training mode with momentum 1).
    norms = [m for m in model.modules() if hasattr(m, "running_mean")]
    with torch.no_grad():
        for m in norms:
            m.momentum = 1.0
        model.train()(torch.stack([Noisy()[i][0] for i in range(8)]))
        for m in norms:
            m.momentum = 0.1
    before = params(model)
    res = train_loop(model, Noisy(), cfg=cfg, total_steps=2, lr_at=lambda s: 0.05, num_classes=3)
    after = params(res["model"])
    stats = [k for k in before if "running_" in k or "num_batches" in k]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert not torch.equal(before["stem.conv.weight"], after["stem.conv.weight"])

    cfg = TrainConfig(batch_size=8, output=str(tmp_path / "probe"), model="bit_tiny", progress=False, linear_probe=True)
    model = tiny()
    before = params(model)
    after = params(train_loop(model, Noisy(), cfg=cfg, total_steps=2, lr_at=lambda s: 0.05, num_classes=3)["model"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.fc.weight", "head.fc.bias"}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_steps(tmp_path, precision):
    res = run(tmp_path, steps=1, precision=precision, channels_last=True)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res["history"])
    state = load_checkpoint(tmp_path / "last.pt")
    assert (state["scaler"] is not None) == (precision == "fp16")


def test_metrics_file_and_progress_bar(tmp_path, capsys):
    run(tmp_path, steps=3, log_every=1)
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all({"loss", "lr", "img_per_s"} <= r.keys() for r in records)
    bar = ProgressBar(10, desc="train")
    text = bar.line(5, loss=0.5, lr=0.01, **{"img/s": 100.0})
    assert "5/10" in text and "loss 0.5" in text and "lr 0.01" in text and "img/s 100" in text and "ETA" in text


def test_step_lr_is_the_hyperrule():
    n = 50_000
    sched = hyperrule.schedule(n)
    for step in (0, 1, 499, 500, 3000, 3001, 6001, 9001, 9999, 10000):
        assert step_lr(step, sched, 0.003) == hyperrule.lr(step, n)


def test_plan_finetune_overrides():
    cfg = FinetuneConfig(batch_size=64)
    plan = plan_finetune(cfg, 700, (8, 8))
    assert plan["schedule"] == [100, 200, 300, 400, 500] and (plan["resize"], plan["crop"]) == (160, 128)
    assert plan["peak_lr"] == pytest.approx(0.003 * 64 / 512) and plan["mixup_alpha"] == 0.0
    assert plan_finetune(FinetuneConfig(steps=50), 700, None)["schedule"] == [10, 20, 30, 40, 50]
    plan = plan_finetune(FinetuneConfig(crop=32, warmup_steps=5, mixup_alpha=0.2), 30_000, (8, 8))
    assert plan["crop"] == 32 and plan["resize"] == 40 and plan["schedule"][0] == 5 and plan["mixup_alpha"] == 0.2
    with pytest.raises(ValueError, match="5 increasing steps"):
        plan_finetune(FinetuneConfig(schedule=[1, 2, 3]), 10, None)


def test_resolution_below_the_minimum_is_refused():
    assert check_resolution(32) == 32
    with pytest.raises(ValueError, match="resolution 16 is smaller than the network's minimum of 32.*--crop 32"):
        check_resolution(16)


def test_eval_sums_agree_with_the_metrics_module():
    from bitfast.train import metrics

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g) * 3
    targets = torch.randint(0, 6, (50,), generator=g)
    sums = EvalSums(6)
    sums.add(logits[:20], targets[:20])
    sums.add(logits[20:], targets[20:])  # additive: two shards give the metrics of the whole
    res = sums.result()
    top = metrics.topk_accuracy(logits, targets, ks=(1, 5))
    assert res["top1"] == pytest.approx(top[1]) and res["top5"] == pytest.approx(top[5])
    assert res["ece"] == pytest.approx(metrics.expected_calibration_error(logits.softmax(1), targets), abs=1e-6)
    cm = metrics.confusion_matrix(logits.argmax(1), targets, 6)
    assert res["confusion"] == cm.tolist()
    assert sum(res["reliability"]["count"]) == 50


def test_ece_hand_computed():
    # Two samples: confidence 0.9 right and 0.6 wrong; bins (0.533, 0.6] and (0.867, 0.933]:
    # ECE = (|1 - 0.9| + |0 - 0.6|) / 2 = 0.35.
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    sums = EvalSums(2)
    sums.add(p.log(), torch.tensor([0, 1]))
    assert sums.result()["ece"] == pytest.approx(0.35)


def test_ema_weights_are_checkpointed_and_used_for_eval(tmp_path):
    from bitfast.train.build import model_from_checkpoint
    from bitfast.train.loop import ema_supported

    with pytest.warns(DeprecationWarning, match="always True"):
        assert ema_supported()  # bitfast's FusedSGD keeps the average (ema_decay)
    res = run(tmp_path, steps=2, ema_decay=0.5)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["ema"] is not None and state["ema"].keys() == state["model"].keys()
    w = "stem.conv.weight"
    assert not torch.equal(state["ema"][w], state["model"][w])
    model, st = model_from_checkpoint(str(tmp_path / "last.pt"))
    assert st["used_ema"] and torch.equal(model.state_dict()[w], state["ema"][w])
    raw, st = model_from_checkpoint(str(tmp_path / "last.pt"), use_ema=False)
    assert not st["used_ema"] and torch.equal(raw.state_dict()[w], params(res["model"])[w])


def test_moved_names_still_import_from_the_loop_with_a_deprecation_warning():
    import importlib

    from bitfast.train import loop

    for name, home in (("TrainConfig", "train.config"), ("StepSampler", "data.sampling"),
                       ("SeededDataset", "data.sampling"), ("MetricsLog", "train.progress"),
                       ("NonFiniteLossError", "train.guards"), ("start_run", "train.outputs")):
        with pytest.warns(DeprecationWarning, match=f"moved to bitfast.{home}"):
            obj = getattr(loop, name)
        assert obj is getattr(importlib.import_module(f"bitfast.{home}"), name)
    with pytest.raises(AttributeError):
        loop.no_such_name  # noqa: B018
