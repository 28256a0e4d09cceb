"""A whole training step in a CUDA graph (``bitfast.train.graphs``, ``--cuda-graphs``).

Without a GPU: the options it refuses and their messages, the CLI flag, the step's body run
eagerly (``capture=False``) against the eager loop's step bit for bit, the packets read back
together, the device copy of the last good state, and the training loop's bookkeeping under
``--cuda-graphs`` (read backs every --log-every steps, the NaN stop's roll-back) with the
capture replaced by eager runs of the same body. With a GPU (``pytest.mark.cuda``): the
captured step against the same body run eagerly, bit for bit, the loop and its NaN stop under
real graphs, and ``bitfast finetune --cuda-graphs`` end to end.
"""

import math
import signal

import pytest
import torch

from bitfast import cli
from bitfast.data.sampling import StepSampler
from bitfast.models import ResNetV2
from bitfast.optim import FusedSGD
from bitfast.train import graphs
from bitfast.train.checkpoint import load_checkpoint
from bitfast.train.config import TrainConfig
from bitfast.train.distributed import DistInfo
from bitfast.train.guards import NonFiniteLossError, RunInterrupted
from bitfast.train.loop import train_loop
from bitfast.train.progress import MetricsLog
from bitfast.train.step import TrainState, apply_update, check_step, forward_backward
from bitfast.train.task import Classification

# One torch thread for every test here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "bit_tiny", "--crop", "32", "--resize", "36", "--batch-size", "8", "--no-progress"]


def tiny(seed=1, norm="gn"):
    torch.manual_seed(seed)
    return ResNetV2((1, 1, 1, 1), base_width=32, num_classes=3, norm=norm, zero_head=False)


class Noisy(torch.utils.data.Dataset):
    """Random 32x32 images, fresh torch noise added per item (the augmentation stand-in)."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(3, 32, 32), int(self.y[i])


def make_state(device="cpu", seed=1, mixup=0.0, ema=None):
    model = tiny(seed).to(device)
    opt = FusedSGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4, ema_decay=ema)
    return TrainState(base=model, net=model, opt=opt, scaler=torch.amp.GradScaler(device, enabled=False),
                      task=Classification(3, mixup_alpha=mixup, seed=0), info=DistInfo(device=torch.device(device)),
                      local_batch=8)


def batches(n, device="cpu"):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 3, 32, 32, generator=g).to(device), torch.randint(0, 3, (8,), generator=g).to(device))
            for _ in range(n)]


def weights(state):
    out = {k: v.detach().clone() for k, v in state.base.state_dict().items()}
    for i, p in enumerate(q for g in state.opt.param_groups for q in g["params"]):
        for k, v in state.opt.state.get(p, {}).items():
            out[f"opt.{i}.{k}"] = v.detach().clone()
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- refusals and the command line ----------------------------------------------------------


def test_conflicts_name_each_option():
    found = graphs.conflicts(device="cpu", precision="fp16", compile=True, distributed=True)
    assert len(found) == 4
    text = " ".join(found)
    for words in ("--device cuda; got --device cpu", "--precision fp16", "--compile", "DDP"):
        assert words in text
    if not torch.cuda.is_available():
        assert "torch sees none" in graphs.conflicts(device=None)[0]


def test_config_refuses_cuda_graphs_on_a_cpu():
    cfg = TrainConfig(model="bit_tiny", device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="--cuda-graphs needs --device cuda; got --device cpu"):
        cfg.validate()
    assert TrainConfig(model="bit_tiny", device="cpu").to_dict()["cuda_graphs"] is False


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_cli_flag_reaches_the_config_and_is_refused_on_a_cpu(tmp_path, capsys, command):
    args = cli.build_parser().parse_args([command, "--cuda-graphs", "--device", "cpu"])
    assert args.cuda_graphs is True
    extra = ["--epochs", "1", "--steps-per-epoch", "1"] if command == "pretrain" else ["--steps", "1"]
    code = cli.main([command, *TINY, *extra, "--cuda-graphs", "--device", "cpu", "--precision", "fp16",
                     "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs needs --device cuda" in err and "--precision fp16" in err


def test_the_loop_refuses_a_cpu_device(tmp_path):
    cfg = TrainConfig(batch_size=8, output=str(tmp_path), model="bit_tiny", progress=False, cuda_graphs=True)
    with pytest.raises(ValueError, match="--cuda-graphs needs --device cuda; got --device cpu"):
        train_loop(tiny(), Noisy(), cfg=cfg, total_steps=2, lr_at=lambda s: 0.01, num_classes=3)


def test_graph_step_refusals():
    state = make_state()
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        graphs.CUDAGraphStep(state, capture=True)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 1"):
        graphs.CUDAGraphStep(state, warmup_steps=0, capture=False)
    sgd = make_state()
    sgd.opt = torch.optim.SGD(sgd.base.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="must be a bitfast.optim.FusedSGD"):
        graphs.CUDAGraphStep(sgd, capture=False)
    fp16 = make_state()
    fp16.scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match="GradScaler"):
        graphs.CUDAGraphStep(fp16, capture=False)


# -- the step's body, the packets, the last good state ---------------------------------------


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_body_equals_the_eager_step_bit_for_bit(mixup):
    """The graph's body (capture=False runs it eagerly) and the eager loop's step
    (forward_backward, check_step, apply_update with a float lr) give the same weights,
    momentum, averages and losses."""
    eager, graphed = make_state(mixup=mixup, ema=0.9), make_state(mixup=mixup, ema=0.9)
    step = graphs.CUDAGraphStep(graphed, capture=False)
    for i, (x, y) in enumerate(batches(5)):
        lr = 0.05 * (i + 1)
        for group in eager.opt.param_groups:
            group["lr"] = lr
        loss, parts = forward_backward(eager, x, y)
        check = check_step(eager, loss, parts, 8)
        apply_update(eager)
        step.set_lr(lr)
        packet = step(x, y)
        assert packet[0].item() / 8 == check.loss and check.problem is None
        assert packet[1].item() < 0.5
    assert graphed.step == eager.step == 5 and step.eager_steps == 5 and not step.captured
    assert_same(weights(eager), weights(graphed))


def test_optimizer_state_dict_keeps_a_float_lr():
    state = make_state()
    step = graphs.CUDAGraphStep(state, capture=False)
    step.set_lr(0.25)
    for x, y in batches(1):
        step(x, y)
    saved = state.opt.state_dict()
    assert saved["param_groups"][0]["lr"] == 0.25
    assert state.opt.param_groups[0]["lr"] is step.lr
    saved["param_groups"][0]["lr"] = 0.125
    state.opt.load_state_dict(saved)
    assert all(g["lr"] is step.lr for g in state.opt.param_groups) and step.lr.item() == 0.125


def test_pending_steps_read_back_in_order_with_the_verdict():
    pending = graphs.PendingSteps(3, torch.device("cpu"))
    pending.push(1, 0.1, torch.tensor([8.0, 0.1, 4.0], dtype=torch.float64))
    pending.push(2, 0.2, torch.tensor([float("nan"), 0.1, 4.0], dtype=torch.float64))
    pending.push(3, 0.3, torch.tensor([8.0, 0.7, 4.0], dtype=torch.float64))
    assert pending.full
    with pytest.raises(RuntimeError, match="read them back first"):
        pending.push(4, 0.4, torch.zeros(3, dtype=torch.float64))
    done = pending.read(["aux"], 8)
    assert [(s, lr) for s, lr, _ in done] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert done[0][2].loss == 1.0 and done[0][2].parts == {"aux": 0.5} and done[0][2].problem is None
    assert "loss is nan at step 2" in done[1][2].problem
    assert "update of step 3" in done[2][2].problem
    assert len(pending) == 0 and pending.read([], 8) == []


def test_last_good_state_rolls_back_weights_momentum_and_generators():
    state = make_state(mixup=0.4)
    step = graphs.CUDAGraphStep(state, capture=False)
    good = graphs.LastGoodState(state)
    with pytest.raises(RuntimeError, match="nothing was taken"):
        good.restore()
    good.take()  # before the first step: no momentum yet
    before = weights(state)
    data = batches(4)
    step.set_lr(0.1)
    step(*data[0])
    assert good.restore() == 0 and state.step == 0
    assert_same(weights(state), before)  # the momentum the first step made is gone too
    step(*data[0])
    good.take()
    after_one = weights(state)
    mix = state.task.generators()["mixup"].get_state()
    step(*data[1])
    step(*data[2])
    assert good.restore() == 1 and state.step == 1
    assert_same(weights(state), after_one)
    assert torch.equal(state.task.generators()["mixup"].get_state(), mix)


# -- the loop's bookkeeping, capture replaced by eager runs ------------------------------------


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """The loop's --cuda-graphs path on a CPU: the device check is lifted and the step's body
    runs eagerly (capture=False, what CUDAGraphStep picks off CUDA)."""
    monkeypatch.setattr(graphs, "check_supported", lambda cfg, info: None)


def run(out, *, steps=6, model=None, data=None, lr_at=None, device="cpu", **kw):
    cfg = TrainConfig(batch_size=8, output=str(out), model="bit_tiny", progress=False, device=device, **kw)
    lr_at = lr_at or (lambda s: 0.05 * (1 + s) / steps)
    return train_loop(model or tiny(), data or Noisy(), cfg=cfg, total_steps=steps, lr_at=lr_at, num_classes=3,
                      info=DistInfo(device=torch.device(device)))


def test_loop_under_graphs_equals_the_eager_loop(tmp_path, graphs_on_cpu):
    eager = run(tmp_path / "eager", log_every=4, mixup_alpha=0.4, ema_decay=0.5, checkpoint_every=3)
    graphed = run(tmp_path / "graphs", log_every=4, mixup_alpha=0.4, ema_decay=0.5, checkpoint_every=3,
                  cuda_graphs=True)
    a, b = eager["model"].state_dict(), graphed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r for r in eager["history"] if r["kind"] == "train"] == \
        [r for r in graphed["history"] if r["kind"] == "train"]
    for name in ("eager", "graphs"):
        steps = [r["step"] for r in MetricsLog.read(str(tmp_path / name / "metrics.jsonl")) if r["kind"] == "train"]
        assert steps == [4, 6]
    ckpt = load_checkpoint(tmp_path / "graphs" / "last.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["cuda_graphs"] is True
    assert isinstance(ckpt["optimizer"]["param_groups"][0]["lr"], float)
    ref = load_checkpoint(tmp_path / "eager" / "last.pt")
    for k in ref["ema"]:
        assert torch.equal(ref["ema"][k], ckpt["ema"][k]), k


def test_resume_under_graphs_is_bit_for_bit(tmp_path, graphs_on_cpu):
    """A run under --cuda-graphs stopped after step 3 (a read back between --log-every ones)
    and resumed under --cuda-graphs ends with the eager uninterrupted run's weights."""
    full = run(tmp_path / "full", steps=6, mixup_alpha=0.4)
    part = run(tmp_path / "cut", steps=6, mixup_alpha=0.4, log_every=2, stop_at_step=3, cuda_graphs=True)
    assert part["step"] == 3 and load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3
    resumed = run(tmp_path / "cut", steps=6, mixup_alpha=0.4, log_every=2, resume="auto", cuda_graphs=True)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in full["history"]][3:] == [r["loss"] for r in resumed["history"]]


def test_sigterm_under_graphs_reads_back_saves_and_stops(tmp_path, graphs_on_cpu):
    """SIGTERM during a step under --cuda-graphs: the step finishes, the pending steps are read
    back and checked, the checkpoint is written and RunInterrupted raised, as in the eager loop."""
    def lr_at(s):
        if s == 2:
            signal.raise_signal(signal.SIGTERM)
        return 0.01

    with pytest.raises(RunInterrupted, match="stopped by SIGTERM after step 3 of 6") as info:
        run(tmp_path, steps=6, log_every=4, cuda_graphs=True, lr_at=lr_at)
    assert info.value.step == 3 and load_checkpoint(tmp_path / "last.pt")["step"] == 3


def test_loop_under_graphs_reads_back_when_the_schedule_ends_early(tmp_path, graphs_on_cpu):
    res = run(tmp_path, steps=6, log_every=4, cuda_graphs=True, lr_at=lambda s: 0.01 if s < 5 else None)
    assert res["step"] == 5 and res["stopped_early"]
    assert [r["step"] for r in res["history"]] == [1, 2, 3, 4, 5]


def test_nan_stop_under_graphs_rolls_back_to_the_last_good_read_back(tmp_path, graphs_on_cpu):
    # The model's output turns NaN on the batch holding sample 19 (see tests/train/test_loop.py).
    ds = Noisy()
    ds.x[19, 0, 0, 0] = 1e4
    sampler = StepSampler(len(ds), 8, total_steps=9, seed=0)
    bad_step = next(s for s in range(9) if any(i == 19 for i, _ in sampler.batch(s))) + 1
    model = tiny()
    model.register_forward_hook(
        lambda m, inp, out: out + torch.where(inp[0][:, 0, 0, 0] > 1e3, float("nan"), 0.0)[:, None])
    log_every = 2
    good_step = (bad_step - 1) // log_every * log_every
    with pytest.raises(NonFiniteLossError, match=f"loss is nan at step {bad_step} .*rolled back to step {good_step}"):
        run(tmp_path, steps=9, model=model, data=ds, log_every=log_every, cuda_graphs=True,
            lr_at=lambda s: 0.01)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == good_step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the state saved is the one the eager loop had after that step
    if good_step:
        ref = run(tmp_path / "ref", steps=good_step, model=tiny(), data=Noisy(), lr_at=lambda s: 0.01)
        for k, v in ref["model"].state_dict().items():
            assert torch.equal(v, state["model"][k]), k


# -- with a GPU ------------------------------------------------------------------------------

cuda = pytest.mark.cuda


@pytest.fixture
def deterministic():
    """cuDNN's deterministic algorithms, so that two runs of the same kernels agree bit for bit."""
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


@cuda
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_captured_step_equals_the_eager_body_bit_for_bit(deterministic, autocast):
    """Captured and replayed steps give bit for bit the weights, momentum, averages and losses
    of the same body run eagerly (same kernels: bitfast's CUDA ops and FusedSGD), with the lr
    changing every step, and a batch of another size runs eagerly beside the graph."""
    ref, got = make_state("cuda", ema=0.9), make_state("cuda", ema=0.9)
    for s in (ref, got):
        s.base.to(memory_format=torch.channels_last)
        s.autocast_dtype = autocast
    eager = graphs.CUDAGraphStep(ref, capture=False)
    graphed = graphs.CUDAGraphStep(got, warmup_steps=2)
    for i, (x, y) in enumerate(batches(7, "cuda")):
        x = x.contiguous(memory_format=torch.channels_last)
        for step in (eager, graphed):
            step.set_lr(0.02 * (i + 1))
        a, b = eager(x, y).clone(), graphed(x, y).clone()
        assert torch.equal(a, b), i
    assert graphed.captured and graphed.replays == 5 and graphed.eager_steps == 2
    assert_same(weights(ref), weights(got))
    x, y = batches(1, "cuda")[0]
    odd = (x[:4].contiguous(memory_format=torch.channels_last), y[:4])
    assert torch.equal(eager(*odd), graphed(*odd)) and graphed.eager_steps == 3
    torch.cuda.synchronize()
    assert_same(weights(ref), weights(got))


@cuda
def test_loop_under_graphs_on_a_gpu(tmp_path, deterministic):
    """The loop with --cuda-graphs on a GPU: losses read back every --log-every steps equal the
    eager loop's, and so do the final weights (same kernels, the lr read from a tensor)."""
    eager = run(tmp_path / "eager", steps=8, log_every=3, device="cuda", channels_last=True, precision="bf16")
    graphed = run(tmp_path / "graphs", steps=8, log_every=3, device="cuda", channels_last=True, precision="bf16",
                  cuda_graphs=True)
    losses = [r["loss"] for r in graphed["history"] if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses == [r["loss"] for r in eager["history"] if r["kind"] == "train"]
    a, b = eager["model"].state_dict(), graphed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_overflow_stop_under_graphs(tmp_path, monkeypatch, device):
    """A step whose update would overflow (a huge lr from step 6 on) stops the run at the read
    back after it (step 8), rolled back to the last good one (step 4), with finite weights
    saved: on a CPU with the capture replaced by eager runs, on a GPU with real graphs."""
    if device == "cpu":
        monkeypatch.setattr(graphs, "check_supported", lambda cfg, info: None)
    with pytest.raises(NonFiniteLossError, match=r"of step [67] .*rolled back to step 4"):
        run(tmp_path, steps=9, log_every=4, device=device, cuda_graphs=True,
            lr_at=lambda s: 0.01 if s < 5 else 3e38)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@cuda
def test_finetune_cli_with_cuda_graphs(tmp_path):
    out = tmp_path / "run"
    code = cli.main(["finetune", *TINY, "--classes", "0", "1", "2", "--steps", "6", "--log-every", "2",
                     "--device", "cuda", "--precision", "bf16", "--channels-last", "--cuda-graphs", "--no-plots",
                     "--output", str(out)])
    assert code == 0
    assert load_checkpoint(out / "last.pt")["config"]["cuda_graphs"] is True
    steps = [r["step"] for r in MetricsLog.read(str(out / "metrics.jsonl")) if r["kind"] == "train"]
    assert steps == [2, 4, 6]
