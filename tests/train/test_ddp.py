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
