"""The training loop is task-generic: a Task says how a batch becomes a loss and what else to
log; classification (with MixUp) is one such task, and a task of another shape (its own
targets, loss, logged parts and random generator) trains, logs and resumes bit for bit with
no change to the loop."""

import json

import pytest
import torch
import torch.nn.functional as F

from bitfast.models import ResNetV2
from bitfast.train import Classification, Task
from bitfast.train.checkpoint import load_checkpoint
from bitfast.train.config import TrainConfig
from bitfast.train.loop import train_loop

# One torch thread for every test here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(num_classes=3):
    torch.manual_seed(1)
    return ResNetV2((1, 1, 1, 1), base_width=32, num_classes=num_classes, zero_head=False)


class Images(torch.utils.data.Dataset):
    """Random 32x32 images with class labels; items add fresh torch noise (augmentation)."""

    def __init__(self, n=24, num_classes=3):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(3, 32, 32), int(self.y[i])


class NoisyRegression(Task):
    """A task of another shape: the 3 outputs regress a target made from the labels, plus a
    noise vector drawn per step from the task's own generator; two loss parts are logged."""

    num_classes = 3

    def __init__(self, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.prepared = 0

    def generators(self):
        return {"noise": self.gen}

    def prepare(self, x, y):
        self.prepared += 1
        target = F.one_hot(y, 3).float() + 0.1 * torch.randn(len(y), 3, generator=self.gen)
        return x, target

    def loss(self, output, x, y):
        mse = ((output.float() - y) ** 2).sum()
        l1 = (output.float() - y).abs().sum()
        return mse + 0.5 * l1, {"mse": mse, "l1": l1}


def cfg(out, **kw):
    return TrainConfig(batch_size=8, output=str(out), model="bit_tiny", progress=False, log_every=1, **kw)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def lr(s):
    return 0.02 * (1 + s) / 4


def test_a_task_of_another_shape_trains_logs_its_parts_and_resumes_bit_for_bit(tmp_path):
    task = NoisyRegression()
    full = train_loop(tiny(), Images(), cfg=cfg(tmp_path / "full", batch_split=2), total_steps=4, lr_at=lr, task=task)
    assert task.prepared == 4  # once per step, before the micro-batches
    train = [r for r in full["history"] if r["kind"] == "train"]
    for r in train:
        # The logged parts are means over the batch, as the loss is, and add up to it.
        assert set(r) >= {"mse", "l1", "loss"} and r["loss"] == pytest.approx(r["mse"] + 0.5 * r["l1"], rel=1e-5)
    lines = [json.loads(s) for s in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mse"] for r in lines if r["kind"] == "train"] == [r["mse"] for r in train]
    state = load_checkpoint(tmp_path / "full" / "last.pt")
    assert state["num_classes"] == 3 and "noise" in state["rng"]["generators"]

    cut = train_loop(tiny(), Images(), cfg=cfg(tmp_path / "cut", batch_split=2, stop_at_step=2), total_steps=4,
                     lr_at=lr, task=NoisyRegression())
    assert cut["step"] == 2
    resumed = train_loop(tiny(), Images(), cfg=cfg(tmp_path / "cut", batch_split=2, resume="auto"), total_steps=4,
                         lr_at=lr, task=NoisyRegression())
    a, b = params(full["model"]), params(resumed["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)  # the task's generator was restored too
    assert [r["mse"] for r in train][2:] == [r["mse"] for r in resumed["history"] if r["kind"] == "train"]


def test_classification_task_is_what_num_classes_gives(tmp_path):
    by_classes = train_loop(tiny(), Images(), cfg=cfg(tmp_path / "a", mixup_alpha=0.4, label_smoothing=0.1),
                            total_steps=3, lr_at=lr, num_classes=3)
    task = Classification(3, mixup_alpha=0.4, label_smoothing=0.1, seed=0)
    by_task = train_loop(tiny(), Images(), cfg=cfg(tmp_path / "b", mixup_alpha=0.4, label_smoothing=0.1),
                         total_steps=3, lr_at=lr, task=task)
    a, b = params(by_classes["model"]), params(by_task["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in by_classes["history"]] == [r["loss"] for r in by_task["history"]]


def test_train_loop_task_arguments_are_checked(tmp_path):
    with pytest.raises(TypeError, match="task= or num_classes="):
        train_loop(tiny(), Images(), cfg=cfg(tmp_path / "a"), total_steps=1, lr_at=lr)
    with pytest.raises(TypeError, match="loss_fn="):
        train_loop(tiny(), Images(), cfg=cfg(tmp_path / "b"), total_steps=1, lr_at=lr, task=Classification(3),
                   loss_fn=lambda x, logits, y: logits.sum())
    with pytest.raises(ValueError, match="num_classes=5 but the task has 3"):
        train_loop(tiny(), Images(), cfg=cfg(tmp_path / "c"), total_steps=1, lr_at=lr, task=Classification(3),
                   num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        Classification(0)
    with pytest.raises(ValueError, match="mixup_alpha"):
        Classification(3, mixup_alpha=-1)
    with pytest.raises(NotImplementedError, match="must define loss"):
        Task().loss(torch.zeros(1), torch.zeros(1), torch.zeros(1))
