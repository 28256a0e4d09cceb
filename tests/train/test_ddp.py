"""DDP on CPU: two gloo processes train the same global batches as one process; parameters
stay in sync, the loss matches, evaluation metrics reduce to the single-process ones."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from bitfast.train.config import TrainConfig
from bitfast.train.distributed import DistInfo, init_distributed, shutdown
from bitfast.train.evaluate import evaluate
from bitfast.train.loop import train_loop

# One torch thread for every test here (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, 32, 32, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _model():
    from bitfast.models import ResNetV2

    torch.manual_seed(1)
    return ResNetV2((1, 1, 1, 1), base_width=32, num_classes=3, zero_head=False)


def _train(out: str, info: DistInfo, batch_size: int = 8):
    # A small lr: at 0.05 the loss went 1.07 -> 1.78 -> 5.11, and so divergent a run
    # amplifies the rounding that differs between a batch of 8 and two of 4 (convolution and
    # reduction orders) past any tolerance that would still catch a real sync fault.
    cfg = TrainConfig(batch_size=batch_size, output=out, model="bit_tiny", progress=False, momentum=0.9, seed=0)
    return train_loop(_model(), _dataset(), cfg=cfg, total_steps=3, lr_at=lambda s: 0.01, num_classes=3, info=info)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        assert info.enabled and info.world_size == world and info.rank == rank
        try:
            _train(os.path.join(out, "tooSmall"), info, batch_size=1)
        except ValueError as exc:
            too_small = str(exc)
        else:
            too_small = ""
        res = _train(os.path.join(out, "run"), info)
        ev = evaluate(res["model"], _dataset(), 3, batch_size=4, info=info)
        torch.save({"params": res["model"].state_dict(), "losses": [r["loss"] for r in res["history"]], "eval": ev,
                    "too_small": too_small}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        shutdown(info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # In sync: every parameter and buffer identical on both processes.
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    assert r0["losses"] == r1["losses"]  # the reduced loss is the same number everywhere
    assert "smaller than the number of processes (2)" in r0["too_small"]
    # Only rank 0 wrote the checkpoint and the metrics.
    assert os.path.exists(tmp_path / "run" / "last.pt") and os.path.exists(tmp_path / "run" / "metrics.jsonl")

    single = _train(str(tmp_path / "single"), DistInfo())
    assert r0["losses"] == pytest.approx([r["loss"] for r in single["history"]], rel=1e-5)
    for k, v in single["model"].state_dict().items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    ev = evaluate(single["model"], _dataset(), 3, batch_size=4)
    assert r0["eval"]["n"] == ev["n"] == 20
    assert r0["eval"]["top1"] == pytest.approx(ev["top1"]) and r0["eval"]["loss"] == pytest.approx(ev["loss"], rel=1e-4)
    assert r0["eval"]["confusion"] == ev["confusion"]


def _profile_worker(rank: int, world: int, port: int, out: str) -> None:
    # One DDP training step of a small BiT profiled on each grouping: when does the first gradient
    # all-reduce start, and when do the weight-standardization backwards run?
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        found = {}
        for grouping in ("auto", "model"):
            model = _model()
            model.ws_grouping = grouping
            groups = len(model.ws_groups())
            # small buckets: several all-reduces, the first for the last stage's parameters
            ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
            x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
            for _ in range(2):  # DDP settles its buckets on the first step
                ddp(x).sum().backward()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                ddp(x).sum().backward()
            events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                      if e.name in ("c10d::allreduce_", "bitfast::native_weight_standardize_multi_bwd")]
            found[grouping] = {"groups": groups, "events": events}
            if rank == 0 and grouping == "auto":
                prof.export_chrome_trace(os.path.join(out, "ddp_stage_grouping_trace.json"))
        torch.save(found, os.path.join(out, f"profile{rank}.pt"))
    finally:
        shutdown(info)


def test_stage_grouping_overlaps_the_gradient_all_reduce_with_the_backward(tmp_path):
    """Under DDP, ``ws_grouping="auto"`` standardizes per stage: the last stage's weight
    gradients are ready after its own backward, so DDP starts all-reducing them while the earlier
    stages still run theirs. With the whole model in one call (``"model"``), every conv-weight
    gradient waits for the one standardization backward at the end, and no all-reduce can start
    before it. Shown on a profile of a DDP step (2 gloo processes)."""
    mp.spawn(_profile_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        found = torch.load(tmp_path / f"profile{rank}.pt", weights_only=False)
        stage, whole = found["auto"], found["model"]
        assert stage["groups"] == 4 and whole["groups"] == 1  # auto is per stage in a process group

        def times(run, name):
            return [(a, b) for n, a, b in run["events"] if n == name]

        ws = times(stage, "bitfast::native_weight_standardize_multi_bwd")
        reduces = times(stage, "c10d::allreduce_")
        assert len(ws) == 4 and len(reduces) >= 2
        # overlap: an all-reduce is launched before the first stage's standardization
        # backward (the last of the backward pass) has started
        assert min(a for a, _ in reduces) < max(a for a, _ in ws)
        (ws_whole,) = times(whole, "bitfast::native_weight_standardize_multi_bwd")
        assert min(a for a, _ in times(whole, "c10d::allreduce_")) > ws_whole[1]
    assert (tmp_path / "ddp_stage_grouping_trace.json").stat().st_size > 0
