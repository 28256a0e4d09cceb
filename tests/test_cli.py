"""The bitfast command: env, models, demo; and the official-layout .npz export it uses."""

import json

import torch

import bitfast
from bitfast import cli
from bitfast.checkpoint.npz_writer import save_npz, timm_to_npz_key


def test_env_json(capsys):
    assert cli.main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == torch.__version__
    assert "reference" in report["available_backends"]
    assert set(report["builds"]) == {"bitfast._C", "bitfast._C_cuda"}
    assert set(report["auto_backend_float32"]) == set(bitfast.backends.families())


def test_env_text(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "available backends" in out and "bitfast._C" in out


def test_models(capsys):
    assert cli.main(["models"]) == 0
    names, tags = capsys.readouterr().out.split("\n\n")
    assert names.split() == bitfast.list_models()
    listed = [line.split()[0] for line in tags.splitlines()[2:]]
    assert listed == bitfast.list_models(include_pretrained=True)[len(bitfast.list_models()):]
    assert "resnetv2_50x1_bit.goog_in21k " in tags and " 21843 " in tags


def test_demo_runs_and_checks_parity(capsys):
    assert cli.main(["demo", "--batch", "2", "--size", "64", "--repeats", "1", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    assert "synthetic official-layout .npz, 153 arrays" in out
    assert "parity vs reference" in out and "OK" in out


def test_demo_bad_model_is_a_clear_error(capsys):
    assert cli.main(["demo", "--model", "resnet50"]) == 2
    assert "unknown model 'resnet50'" in capsys.readouterr().err


def test_default_images_are_deterministic_and_in_range():
    a, b = cli.default_images(3, 32), cli.default_images(3, 32)
    assert torch.equal(a, b) and a.shape == (3, 3, 32, 32)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1


def test_save_npz_round_trip(tmp_path):
    model = bitfast.create_model("resnetv2_50x1_bit", num_classes=7)
    path = tmp_path / "w.npz"
    keys = save_npz(model, path)
    assert len(keys) == 153
    assert timm_to_npz_key("stages.0.blocks.0.downsample.conv.weight") == "resnet/block1/unit01/a/proj/standardized_conv2d/kernel"
    assert timm_to_npz_key("stages.2.blocks.10.norm3.bias") == "resnet/block3/unit11/c/group_norm/beta"
    fresh = bitfast.create_model("resnetv2_50x1_bit", num_classes=7)
    bitfast.load_pretrained(fresh, str(path))
    for (k, v), w in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v, w), k
