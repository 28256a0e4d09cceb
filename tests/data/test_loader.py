"""make_loader: deterministic order from (seed, epoch), sharding, padding, defaults."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from bitfast.data import DigitsDataset, EpochSampler, default_workers, make_loader, set_epoch


def _ids(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_order_depends_on_seed_and_epoch_only():
    ds = TensorDataset(torch.zeros(50, 2), torch.arange(50))
    a = make_loader(ds, 8, train=True, seed=1)
    b = make_loader(ds, 8, train=True, seed=1)
    first = _ids(a)
    assert len(first) == 48 and len(set(first)) == 48  # drop_last: 6 full batches
    assert _ids(b) == first and _ids(a) == first  # re-iterating without set_epoch repeats
    set_epoch(a, 1)
    second = _ids(a)
    assert second != first
    set_epoch(b, 1)
    assert _ids(b) == second  # a resumed run at epoch 1 sees the same batches
    assert _ids(make_loader(ds, 8, train=True, seed=2)) != first


def test_eval_keeps_order_and_everything():
    ds = TensorDataset(torch.zeros(10, 2), torch.arange(10))
    loader = make_loader(ds, 4, train=False)
    assert _ids(loader) == list(range(10))
    assert [len(y) for _, y in loader] == [4, 4, 2]


def test_small_training_set_keeps_its_last_batch():
    ds = TensorDataset(torch.zeros(5, 2), torch.arange(5))
    assert sorted(_ids(make_loader(ds, 8, train=True))) == list(range(5))


def test_sharding_covers_the_epoch():
    # Training shards are padded to equal length; eval shards partition the data exactly.
    train = [list(EpochSampler(10, shuffle=True, seed=3, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(s) == 3 for s in train)
    flat = sum(train, [])
    assert set(flat) == set(range(10)) and len(flat) == 12
    evals = [list(EpochSampler(10, shuffle=False, num_replicas=4, rank=r)) for r in range(4)]
    assert sorted(sum(evals, [])) == list(range(10))
    assert [len(s) for s in evals] == [3, 3, 2, 2]
    assert len(EpochSampler(10, shuffle=False, num_replicas=4, rank=3)) == 2


def test_distributed_needs_a_process_group():
    ds = TensorDataset(torch.zeros(4, 2), torch.arange(4))
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_loader(ds, 2, train=True, distributed=True)


class _OnDisk(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.rand(2), i


def test_default_workers_and_worker_determinism():
    assert default_workers(DigitsDataset(classes=[0], split="test", resolution=8)) == 0
    assert default_workers(TensorDataset(torch.zeros(2))) == 0
    assert 0 <= default_workers(_OnDisk()) <= 4
    # Worker processes draw from streams seeded by (seed, epoch).
    runs = []
    for _ in range(2):
        loader = make_loader(_OnDisk(), 3, train=True, workers=1, seed=5)
        set_epoch(loader, 2)
        runs.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "kwargs, words",
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 2, "workers": -1}, "workers")],
)
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        make_loader(TensorDataset(torch.zeros(3)), train=True, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        make_loader(TensorDataset(torch.zeros(0)), 2, train=False)


def test_distributed_single_process_group(tmp_path):
    # A one-process gloo group exercises the distributed path without spawning processes.
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ds = TensorDataset(torch.zeros(9, 2), torch.arange(9))
        loader = make_loader(ds, 4, train=True, distributed=True, seed=3)
        assert isinstance(loader.sampler, EpochSampler) and loader.sampler.num_replicas == 1
        assert _ids(loader) == _ids(make_loader(ds, 4, train=True, seed=3))
    finally:
        dist.destroy_process_group()
