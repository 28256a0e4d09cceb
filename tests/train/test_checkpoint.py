"""Training checkpoints: atomic writes, format checks, RNG state, start-of-run probes."""

import os
import random

import pytest
import torch

from bitfast.train import checkpoint as ckpt


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / "run" / "last.pt"
    state = {"model": {"w": torch.arange(6.0)}, "step": 7, "config": {"model": "bit_tiny"}}
    assert ckpt.save_checkpoint(path, state) == str(path)
    back = ckpt.load_checkpoint(path)
    assert back["format"] == ckpt.FORMAT and back["step"] == 7
    assert torch.equal(back["model"]["w"], torch.arange(6.0))
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"step": 1})

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "weights.pt"
    torch.save({"stem.conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a bitfast training checkpoint"):
        ckpt.load_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ckpt.CheckpointError, match="could not be read"):
        ckpt.load_checkpoint(garbage)


def test_check_compatible_names_what_differs():
    state = {"config": {"model": "bit_tiny"}, "num_classes": 5}
    ckpt.check_compatible(state, model="bit_tiny", num_classes=5)
    with pytest.raises(ckpt.CheckpointError, match="written for model 'bit_tiny'.*resnetv2_50x1_bit.*--model bit_tiny"):
        ckpt.check_compatible(state, model="resnetv2_50x1_bit", num_classes=5)
    with pytest.raises(ckpt.CheckpointError, match="5-class head.*10 classes"):
        ckpt.check_compatible(state, model="bit_tiny", num_classes=10)


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(3)
    state = ckpt.get_rng_state({"mixup": g})
    expect = (random.random(), torch.rand(3), torch.rand(2, generator=g))
    random.random(), torch.rand(5), torch.rand(4, generator=g)  # move every generator on
    ckpt.set_rng_state(state, {"mixup": g})
    got = (random.random(), torch.rand(3), torch.rand(2, generator=g))
    assert got[0] == expect[0] and torch.equal(got[1], expect[1]) and torch.equal(got[2], expect[2])


def test_probe_output_dir_fails_early(tmp_path, monkeypatch):
    ckpt.probe_output_dir(tmp_path / "new" / "dir", need_bytes=1000)
    assert os.listdir(tmp_path / "new" / "dir") == []  # the probe file is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="cannot be created.*writable --output"):
        ckpt.probe_output_dir(blocker / "sub")

    class Usage:
        free = 10 * 2**20

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: Usage)
    with pytest.raises(ckpt.CheckpointError, match="10.0 MiB free; checkpoints need about 100.0 MiB"):
        ckpt.probe_output_dir(tmp_path, need_bytes=100 * 2**20)


def test_probe_output_dir_unwritable(tmp_path, monkeypatch):
    real_open = open

    def no_space(path, *args, **kwargs):
        if ".bitfast-write-probe" in str(path):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_space)
    with pytest.raises(ckpt.CheckpointError, match="not writable \\(No space left on device\\)"):
        ckpt.probe_output_dir(tmp_path)


def test_mmap_reads_the_same_checkpoint(tmp_path, monkeypatch):
    """``mmap=True`` (what reading a checkpoint's resolution uses) gives the same entries, maps
    zip-format files and reads the others in full."""
    state = {"model": {"w": torch.randn(64, 3)}, "step": 7, "resolution": 32}
    path = ckpt.save_checkpoint(str(tmp_path / "a.pt"), state)
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw.get("mmap")) or real_load(*a, **kw))
    mapped = ckpt.load_checkpoint(path, mmap=True)
    assert mapped["step"] == 7 and mapped["resolution"] == 32 and torch.equal(mapped["model"]["w"], state["model"]["w"])
    legacy = str(tmp_path / "legacy.pt")  # the pre-zip torch.save format cannot be mapped
    real_save = torch.save
    real_save(real_load(path, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    again = ckpt.load_checkpoint(legacy, mmap=True)
    assert torch.equal(again["model"]["w"], state["model"]["w"])
    assert seen == [True, False]
