"""No file that bitfast reads can run code.

Crafted files (a ``torch.save`` payload whose unpickling would create a marker file, in the
zip and the legacy format; the same payload inside an otherwise valid training checkpoint of
the current and of the earlier format; a ``.npz`` with an object array) are handed to every
entry point that reads a training checkpoint or weights, on the command line and in Python:
each is refused with an error naming the file (and the opt-in, where one exists), and the
marker never appears. Checkpoints of the earlier format (``bitfast-train-v1``, with a pickled
NumPy RNG state) load with the opt-in, resume bit for bit and convert once.
"""

import os
import re

import numpy as np
import pytest
import torch

from bitfast import cli, load_pretrained
from bitfast.checkpoint.io import UnsafeFileError
from bitfast.models import ResNetV2
from bitfast.train import checkpoint as ckpt
from bitfast.train.build import build_model, model_from_checkpoint
from bitfast.train.config import TrainConfig

TINY = ["--model", "bit_tiny", "--crop", "32", "--resize", "36", "--batch-size", "8", "--no-progress", "--no-plots"]


class _Touch:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _Exec:
    """Unpickling this runs ``exec`` of code that writes MARKER."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real 4-step fine-tuning run on digits 5-6 stopped after step 2 (last.pt at step 2)
    and its uninterrupted twin."""
    root = tmp_path_factory.mktemp("run")
    common = ["finetune", *TINY, "--classes", "5", "6", "--steps", "4", "--base-lr", "0.3", "--ema-decay", "0.5",
              "--mixup-alpha", "0.2"]
    assert cli.main([*common, "--output", str(root / "cut"), "--stop-at-step", "2"]) == 0
    assert cli.main([*common, "--output", str(root / "full")]) == 0
    return {"root": root, "common": common, "cut": root / "cut" / "last.pt", "full": root / "full" / "last.pt"}


def _legacy_copy(src, dst, **extra):
    """``src`` (current format) rewritten as the earlier bitfast versions wrote it: format
    ``bitfast-train-v1`` and NumPy's RNG state as NumPy's own tuple (a pickled ndarray)."""
    state = torch.load(src, weights_only=True)
    np_state = state["rng"]["numpy"]
    state["rng"]["numpy"] = (np_state["bit_generator"], np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"])
    state["format"] = "bitfast-train-v1"
    state.update(extra)
    torch.save(state, dst)
    return dst


@pytest.fixture(scope="module")
def crafted(run, tmp_path_factory):
    """The crafted files and the marker path their payloads would create."""
    root = tmp_path_factory.mktemp("crafted")
    marker = root / "PWNED"
    files = {}
    files["payload.pt"] = root / "payload.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Touch(marker)}, files["payload.pt"])
    files["payload_legacy.pt"] = root / "payload_legacy.pt"
    torch.save({"x": _Exec(marker)}, files["payload_legacy.pt"], _use_new_zipfile_serialization=False)
    # An otherwise valid training checkpoint of the current format, with the payload in a note.
    state = torch.load(run["cut"], weights_only=True)
    state["note"] = _Touch(marker)
    files["valid_looking.pt"] = root / "valid_looking.pt"
    torch.save(state, files["valid_looking.pt"])
    # The same as the earlier format would have it (its NumPy state needs a full unpickling anyway).
    files["valid_looking_v1.pt"] = _legacy_copy(run["cut"], root / "valid_looking_v1.pt", note=_Exec(marker))
    files["objects.npz"] = root / "objects.npz"
    np.savez(files["objects.npz"], **{"stem/conv/kernel": np.array([_Touch(marker)], dtype=object)})
    return {"files": files, "marker": marker}


def test_the_payloads_are_live(crafted, tmp_path):
    """The crafted payloads do run code when fully unpickled (so the refusals below mean something)."""
    for cls in (_Touch, _Exec):
        marker = tmp_path / cls.__name__
        path = tmp_path / f"{cls.__name__}.pt"
        torch.save({"x": cls(marker)}, path)
        torch.load(path, weights_only=False)
        assert marker.exists()
    assert not crafted["marker"].exists()


def _cli_entry_points(path, run, out):
    ck = str(path)
    return {
        "eval --checkpoint": ["eval", "--checkpoint", ck, "--output", str(out / "eval")],
        "finetune --pretrained": ["finetune", *TINY, "--classes", "5", "6", "--steps", "1", "--pretrained", ck,
                                  "--output", str(out / "ft")],
        "finetune --resume": [*run["common"], "--resume", ck, "--output", str(out / "resume")],
        "pretrain --resume": ["pretrain", *TINY, "--classes", "5", "6", "--epochs", "1", "--steps-per-epoch", "1",
                              "--resume", ck, "--output", str(out / "pre")],
        "export": ["export", ck, "--out", str(out / "export")],
        "fewshot --checkpoint": ["fewshot", "--checkpoint", ck, "--classes", "5", "6", "--shots", "1", "--seeds", "0",
                                 "--methods", "ridge", "--no-progress", "--output", str(out / "fs")],
        "distill --teacher": ["distill", *TINY, "--teacher", ck, "--classes", "5", "6", "--steps", "1",
                              "--output", str(out / "distill")],
        "distill --teacher-pretrained": ["distill", *TINY, "--teacher", "bit_tiny", "--teacher-pretrained", ck,
                                         "--classes", "5", "6", "--steps", "1", "--output", str(out / "distill2")],
    }


@pytest.mark.parametrize("name", ["payload.pt", "payload_legacy.pt", "valid_looking.pt", "valid_looking_v1.pt",
                                  "objects.npz"])
def test_every_cli_entry_point_refuses_crafted_files(name, crafted, run, tmp_path, capsys):
    path = crafted["files"][name]
    for what, argv in _cli_entry_points(path, run, tmp_path).items():
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2, (what, err)
        assert str(path) in err, (what, err)
        if name.endswith(".npz"):
            assert "object arrays" in err or "not a bitfast training checkpoint" in err, (what, err)
        else:
            assert "--trust-checkpoint" in err and "arbitrary code" in err, (what, err)
        assert not crafted["marker"].exists(), what


@pytest.mark.parametrize("name", ["payload.pt", "payload_legacy.pt", "valid_looking.pt", "valid_looking_v1.pt",
                                  "objects.npz"])
def test_every_python_entry_point_refuses_crafted_files(name, crafted):
    path = crafted["files"][name]
    torch_file = not name.endswith(".npz")
    # Training-checkpoint readers raise UntrustedCheckpointError for a torch file; the weights
    # loader and every reader of a .npz raise their own refusal.
    refusal = ckpt.UntrustedCheckpointError if torch_file else (ckpt.CheckpointError, UnsafeFileError)
    calls = {
        "load_checkpoint": lambda: ckpt.load_checkpoint(path),
        "model_from_checkpoint": lambda: model_from_checkpoint(str(path)),
        "build_model(pretrained=)": lambda: build_model(TrainConfig(model="bit_tiny", pretrained=str(path)), 2),
        "load_pretrained": lambda: load_pretrained(ResNetV2((1, 1, 1, 1), base_width=32, num_classes=2), str(path)),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert str(path) in msg, (what, msg)
        expected = UnsafeFileError if what == "load_pretrained" else refusal
        assert isinstance(info.value, expected), (what, type(info.value))
        if torch_file:
            assert "--trust-checkpoint" in msg and "trusted=True" in msg, (what, msg)
        assert not crafted["marker"].exists(), what


def test_the_opt_in_is_what_unpickles(tmp_path):
    """trusted=True does unpickle in full, running whatever the file carries: it is an opt-in
    for files the user vouches for, and nothing without it."""
    marker = tmp_path / "ran"
    path = tmp_path / "v1.pt"
    torch.save({"format": "bitfast-train-v1", "note": _Touch(marker)}, path)
    with pytest.raises(ckpt.UntrustedCheckpointError):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    assert ckpt.load_checkpoint(path, trusted=True)["format"] == ckpt.FORMAT
    assert marker.exists()


def test_checkpoints_load_with_weights_only(run):
    state = torch.load(run["cut"], weights_only=True)  # torch's own safe loader reads bitfast's checkpoints
    assert state["format"] == ckpt.FORMAT == "bitfast-train-v2" and state["step"] == 2
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor) and state["ema"] is not None


def test_legacy_checkpoint_needs_the_opt_in_then_resumes_and_converts(run, tmp_path, capsys):
    v1 = _legacy_copy(run["cut"], tmp_path / "v1.pt")
    with pytest.raises(ckpt.UntrustedCheckpointError, match="numpy.*--trust-checkpoint.*convert-checkpoint"):
        ckpt.load_checkpoint(v1)
    current = ckpt.load_checkpoint(run["cut"])
    old = ckpt.load_checkpoint(v1, trusted=True)
    assert old["format"] == ckpt.FORMAT and old["step"] == current["step"]
    for key in ("model", "ema"):
        assert all(torch.equal(old[key][k], v) for k, v in current[key].items())
    assert old["rng"]["numpy"]["pos"] == current["rng"]["numpy"]["pos"]
    assert torch.equal(old["rng"]["numpy"]["key"], current["rng"]["numpy"]["key"])

    # Resume: refused without the flag, bit for bit with it (the uninterrupted run's weights).
    assert cli.main([*run["common"], "--resume", str(v1), "--output", str(tmp_path / "r0")]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert cli.main([*run["common"], "--resume", str(v1), "--trust-checkpoint", "--output", str(tmp_path / "r1")]) == 0
    full, resumed = ckpt.load_checkpoint(run["full"]), ckpt.load_checkpoint(tmp_path / "r1" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(resumed[key][k], v) for k, v in full[key].items()), key

    # Evaluation with the flag; conversion once, after which no flag is needed.
    assert cli.main(["eval", "--checkpoint", str(v1), "--output", str(tmp_path / "ev")]) == 2
    assert cli.main(["eval", "--checkpoint", str(v1), "--trust-checkpoint", "--output", str(tmp_path / "ev")]) == 0
    assert cli.main(["convert-checkpoint", str(v1), "--output", str(tmp_path / "v2.pt")]) == 0
    assert "converted to format bitfast-train-v2" in capsys.readouterr().out
    converted = ckpt.load_checkpoint(tmp_path / "v2.pt")
    assert all(torch.equal(converted["model"][k], v) for k, v in current["model"].items())
    assert cli.main(["convert-checkpoint", str(v1)]) == 0  # in place
    assert ckpt.load_checkpoint(v1)["format"] == ckpt.FORMAT
    assert sorted(os.listdir(tmp_path)) == sorted(["v1.pt", "v2.pt", "r0", "r1", "ev"])  # no temporary file left
    assert cli.main(["convert-checkpoint", str(v1)]) == 0
    assert "already in format" in capsys.readouterr().out


def test_every_cli_entry_point_reads_a_legacy_checkpoint_with_the_opt_in(run, tmp_path, capsys):
    v1 = _legacy_copy(run["cut"], tmp_path / "v1.pt")
    for what, argv in _cli_entry_points(v1, run, tmp_path).items():
        if what == "pretrain --resume":  # a finetune checkpoint: pretrain refuses it for another reason
            continue
        assert cli.main([*argv, "--trust-checkpoint"]) == 0, (what, capsys.readouterr().err)
    capsys.readouterr()


def test_save_refuses_what_would_need_unpickling(tmp_path):
    path = tmp_path / "last.pt"
    for bad, where in ((np.zeros(3), "state['x'] is a numpy.ndarray"), (object(), "state['x'] is a builtins.object"),
                       ({1.5: 1}, "state['x'] has a key of type float"),
                       ([TrainConfig()], "state['x'][0] is a bitfast.train.config.TrainConfig")):
        with pytest.raises(TypeError, match=re.escape(where)):
            ckpt.save_checkpoint(path, {"x": bad})
    assert not path.exists() and os.listdir(tmp_path) == []


def test_rng_state_is_plain_data_and_restores_numpy(tmp_path):
    np.random.seed(5)
    state = ckpt.get_rng_state()
    ckpt.check_plain_data(state)
    expect = np.random.rand(4)
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"rng": state})
    np.random.rand(7)
    ckpt.set_rng_state(ckpt.load_checkpoint(path)["rng"])
    assert np.array_equal(np.random.rand(4), expect)


def test_a_run_with_unsaveable_config_fails_before_training(tmp_path):
    from bitfast.train.loop import train_loop

    cfg = TrainConfig(model="bit_tiny", batch_size=4, output=str(tmp_path), progress=False, extra={"obj": object()})
    model = ResNetV2((1, 1, 1, 1), base_width=32, num_classes=2)
    with pytest.raises(TypeError, match=r"the run's config\['extra'\]\['obj'\]"):
        train_loop(model, [(torch.zeros(3, 32, 32), 0)] * 4, cfg=cfg, total_steps=1, lr_at=lambda s: 0.1,
                   num_classes=2)
    assert not (tmp_path / "last.pt").exists()
