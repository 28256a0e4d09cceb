"""Weights by timm's pretrained names and from the Hugging Face Hub, offline.

The Hub tests never touch the network: they write a Hugging Face cache (the layout
``huggingface_hub`` reads: ``models--ORG--NAME/{refs/main,snapshots/<commit>/<file>}``) with
timm-format weights of a random model, and read it with offline mode on.
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bitfast
from bitfast import create_model, load_pretrained
from bitfast.checkpoint import PRETRAINED_TAGS, parse_hub_name, source_cfg
from bitfast.checkpoint.io import UnsafeFileError
from bitfast.models import ResNetV2, list_models

from .synth import random_state

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The published names and their class counts and evaluation sizes, written out here
# independently of the table in bitfast.checkpoint.tags.
ARCHS = ("50x1", "50x3", "101x1", "101x3", "152x2", "152x4")
EXPECTED = {
    "resnetv2_50x1_bit.goog_distilled_in1k": (1000, 224, "bicubic"),
    "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k": (1000, 224, "bicubic"),
    "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384": (1000, 384, "bicubic"),
    **{f"resnetv2_{a}_bit.goog_in21k_ft_in1k": (1000, 480 if a == "152x4" else 448, "bilinear") for a in ARCHS},
    **{f"resnetv2_{a}_bit.goog_in21k": (21843, 224, "bilinear") for a in ARCHS},
}


def test_every_published_name_is_listed():
    assert sorted(PRETRAINED_TAGS) == sorted(EXPECTED)
    assert list_models(include_pretrained=True) == list_models() + list(PRETRAINED_TAGS)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_name_builds_its_architecture_with_its_class_count(name):
    classes, size, interpolation = EXPECTED[name]
    model = create_model(name, device="meta")
    arch = name.split(".")[0]
    assert model.model_name == arch and model.arch == "R" + arch.split("_")[1]
    assert model.num_classes == classes
    cfg = model.pretrained_cfg
    assert cfg is PRETRAINED_TAGS[name] and cfg.num_classes == classes
    assert cfg.input_size == (3, size, size) and cfg.interpolation == interpolation
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5)  # BiT's [-1, 1]
    assert cfg.crop_pct == (0.875 if size == 224 else 1.0)
    assert cfg.hf_hub_id == f"timm/{name}" and cfg.architecture == arch
    assert parse_hub_name(name).repo_id == f"timm/{name}"


def test_explicit_num_classes_overrides_the_name():
    model = create_model("resnetv2_50x1_bit.goog_in21k", num_classes=10, device="meta")
    assert model.num_classes == 10
    assert model.pretrained_cfg.num_classes == 21843  # the cfg describes the weights
    assert create_model("resnetv2_50x1_bit.goog_in21k", num_classes=0, device="meta").num_classes == 0
    assert create_model("resnetv2_50x1_bit", device="meta").pretrained_cfg is None
    assert create_model("resnetv2_50x1_bit", device="meta").num_classes == 1000


def test_release_names_map_to_their_published_equivalent():
    assert source_cfg("BiT-M-R50x1").name == "resnetv2_50x1_bit.goog_in21k"
    assert source_cfg("BiT-M-R152x4-ILSVRC2012").name == "resnetv2_152x4_bit.goog_in21k_ft_in1k"
    assert source_cfg("BiT-S-R50x1") is None
    assert bitfast.models.default_release("bit_m_r50x1") == "BiT-M-R50x1"


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: create_model("resnetv2_50x1_bit.goog_in22k"), ValueError,
         r"unknown pretrained name 'resnetv2_50x1_bit.goog_in22k'.*resnetv2_50x1_bit.goog_in21k"),
        (lambda: create_model("resnet50.a1_in1k"), ValueError, r"unknown pretrained name"),
        (lambda: create_model("bit_tiny", pretrained="hf-hub:no-slash"), ValueError, r"not a Hub name"),
        (lambda: create_model("bit_tiny", pretrained="hf-hub:timm/x@"), ValueError, r"not a Hub name"),
        # The architecture is checked before anything is downloaded (or huggingface_hub imported).
        (lambda: create_model("resnetv2_101x1_bit", pretrained="timm/resnetv2_50x1_bit.goog_in21k"), ValueError,
         r"resnetv2_50x1_bit \(R50x1\) but the model is R101x1"),
        (lambda: create_model("bit_tiny", pretrained="resnetv2_50x1_bit.goog_in21k"), ValueError,
         r"weights for resnetv2_50x1_bit but the model is bit_tiny"),
        (lambda: load_pretrained(create_model("resnetv2_50x3_bit"), "hf-hub:timm/resnetv2_50x1_bit.goog_in21k"),
         ValueError, r"but the model is R50x3"),
    ],
)
def test_bad_names(call, exc, pattern, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(exc, match=pattern):
        call()


def test_missing_huggingface_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import huggingface_hub raises ImportError
    with pytest.raises(ImportError, match=r"pip install huggingface_hub"):
        create_model("resnetv2_50x1_bit.goog_in21k", pretrained=True)
    with pytest.raises(ImportError, match=r"pip install huggingface_hub"):
        load_pretrained(create_model("bit_tiny"), "hf-hub:me/bit-tiny")
    # Names alone need no huggingface_hub.
    assert create_model("resnetv2_50x1_bit.goog_in21k", device="meta").num_classes == 21843


def test_bitfast_imports_without_huggingface_hub():
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"
        "import bitfast, bitfast.checkpoint, bitfast.cli, bitfast.train\n"
        "m = bitfast.create_model('resnetv2_50x1_bit.goog_in21k', device='meta')\n"
        "assert m.num_classes == 21843\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --- the Hub, offline -------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_cache(cache, repo_id: str, files: dict) -> None:
    """Files of a Hub repository in a Hugging Face cache, as ``huggingface_hub`` lays it out."""
    from huggingface_hub.file_download import repo_folder_name

    folder = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    for name, write in files.items():
        write(snapshot / name)


def timm_config(architecture: str, num_classes: int, **pretrained_cfg) -> dict:
    """A config.json as timm writes it for the Hub."""
    return {"architecture": architecture, "num_classes": num_classes, "num_features": 2048,
            "pretrained_cfg": {"tag": None, "custom_load": False, "input_size": [3, 224, 224], "crop_pct": 0.875,
                               "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                               "classifier": "head.fc", **pretrained_cfg}}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, with offline mode on (no network in any case)."""
    pytest.importorskip("huggingface_hub", reason="the Hub tests need huggingface_hub (pip install huggingface_hub)")
    pytest.importorskip("safetensors", reason="timm's Hub weights are .safetensors files")
    constants = importlib.import_module("huggingface_hub.constants")
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both variables when it is imported: set its copies as well.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def tiny_weights(num_classes: int, seed: int = 3) -> dict[str, torch.Tensor]:
    return random_state(ResNetV2((1, 1, 1, 1), base_width=32, num_classes=num_classes), seed=seed)


def save_safetensors(state):
    from safetensors.torch import save_file

    return lambda path: save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def save_json(obj):
    return lambda path: path.write_text(json.dumps(obj))


def test_hub_round_trip_safetensors(hub_cache):
    state = tiny_weights(7)
    labels = [f"class{i}" for i in range(7)]
    config = timm_config("bit_tiny", 7, input_size=[3, 96, 96], interpolation="bicubic", crop_pct=1.0)
    config["label_names"] = labels
    write_cache(hub_cache, "me/bit-tiny", {"model.safetensors": save_safetensors(state),
                                           "config.json": save_json(config)})
    model = create_model("bit_tiny", pretrained="hf-hub:me/bit-tiny")
    assert model.num_classes == 7  # from config.json
    report = model.pretrained_report
    assert report.container == "safetensors" and report.head_loaded and not report.missing
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    cfg = model.pretrained_cfg
    assert cfg.name == "me/bit-tiny" and cfg.architecture == "bit_tiny" and cfg.num_classes == 7
    assert cfg.input_size == (3, 96, 96) and cfg.interpolation == "bicubic" and cfg.crop_pct == 1.0
    assert cfg.label_names == tuple(labels)
    # load_pretrained reports the cfg without changing the model's attributes
    other = create_model("bit_tiny", num_classes=3)
    rep = load_pretrained(other, "hf-hub:me/bit-tiny@" + COMMIT)
    assert not rep.head_loaded and "7 classes, the model 3" in rep.head_note
    assert rep.pretrained_cfg == cfg and other.pretrained_cfg is None


def test_hub_pytorch_model_bin_and_its_safety(hub_cache, tmp_path):
    state = tiny_weights(4, seed=5)
    write_cache(hub_cache, "me/bin-only", {"pytorch_model.bin": lambda p: torch.save(state, p)})
    model = create_model("bit_tiny", num_classes=4, pretrained="hf-hub:me/bin-only")
    assert model.pretrained_report.container == "torch" and model.pretrained_report.head_loaded
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.pretrained_cfg is None  # no config.json, not a published name

    class Payload:  # an object that only a full unpickling would build
        def __reduce__(self):
            return (os.getcwd, ())

    write_cache(hub_cache, "me/unsafe", {"pytorch_model.bin": lambda p: torch.save({"x": Payload(), **state}, p)})
    with pytest.raises(UnsafeFileError, match=r"never unpickled"):
        create_model("bit_tiny", num_classes=4, pretrained="hf-hub:me/unsafe")


def test_hub_offline_without_the_file(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE"):
        create_model("bit_tiny", num_classes=4, pretrained="hf-hub:me/not-cached")
    write_cache(hub_cache, "me/config-only", {"config.json": save_json(timm_config("bit_tiny", 4))})
    with pytest.raises(FileNotFoundError, match=r"no weights file \(model.safetensors or pytorch_model.bin\)"):
        create_model("bit_tiny", pretrained="hf-hub:me/config-only")


@pytest.mark.slow
def test_published_name_round_trip_in_a_fresh_process(tmp_path):
    """``create_model("resnetv2_50x1_bit.goog_in21k", pretrained=True)`` and ``timm/<name>``
    in a fresh process given only HF_HOME and HF_HUB_OFFLINE=1, as a user would: R50x1
    weights (a 10-class head to keep the file small; float16, which the loader casts)."""
    pytest.importorskip("huggingface_hub", reason="the Hub tests need huggingface_hub (pip install huggingface_hub)")
    pytest.importorskip("safetensors", reason="timm's Hub weights are .safetensors files")
    name = "resnetv2_50x1_bit.goog_in21k"
    state = random_state(ResNetV2((3, 4, 6, 3), 1, num_classes=10), seed=11)
    half = {k: v.half() for k, v in state.items()}
    cache = tmp_path / "hf" / "hub"
    write_cache(cache, f"timm/{name}", {"model.safetensors": save_safetensors(half),
                                         "config.json": save_json(timm_config("resnetv2_50x1_bit", 10))})
    code = textwrap.dedent(f"""
        import torch, bitfast
        from safetensors.torch import load_file
        want = load_file({str(cache / ("models--timm--" + name) / "snapshots" / COMMIT / "model.safetensors")!r})
        m = bitfast.create_model({name!r}, num_classes=10, pretrained=True)
        assert m.pretrained_report.head_loaded, m.pretrained_report
        assert all(torch.equal(m.state_dict()[k], v.float()) for k, v in want.items())
        assert m.pretrained_cfg.name == {name!r} and m.pretrained_cfg.num_classes == 10  # config.json's
        m5 = bitfast.create_model("resnetv2_50x1_bit", num_classes=5, pretrained="timm/{name}")
        r = m5.pretrained_report
        assert not r.head_loaded and r.skipped_head == ["head.fc.weight", "head.fc.bias"], r
        assert torch.equal(m5.stem.conv.weight, want["stem.conv.weight"].float())
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
