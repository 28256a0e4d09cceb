"""create_model / list_models: names, parameter counts of the six BiT architectures
(SPEC-bit.md table, on the meta device) and argument errors."""

import pytest
import torch

import bitfast
from bitfast.models import ResNetV2, create_model, default_release, list_models

# arch -> (backbone, with 1000-class head, with 21843-class head), in millions (SPEC-bit.md)
PARAMS = {
    "resnetv2_50x1_bit": (23.50, 25.55, 68.26),
    "resnetv2_50x3_bit": (211.17, 217.32, 345.40),
    "resnetv2_101x1_bit": (42.49, 44.54, 87.25),
    "resnetv2_101x3_bit": (381.79, 387.93, 516.02),
    "resnetv2_152x2_bit": (232.24, 236.34, 321.73),
    "resnetv2_152x4_bit": (928.34, 936.53, 1107.30),
}


def millions(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def test_list_models():
    assert list_models() == list(PARAMS)
    assert bitfast.list_models is list_models
    aliases = list_models(include_aliases=True)
    assert "bit_r50x1" in aliases and "bit_m_r152x2" in aliases and "bit_s_r152x4" in aliases
    assert "bit_s_r152x2" not in aliases  # never released


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts(name):
    backbone, k1000, k21843 = PARAMS[name]
    for k, want in ((0, backbone), (1000, k1000), (21843, k21843)):
        model = create_model(name, num_classes=k, device="meta")
        assert millions(model) == want, (name, k)
    assert all(p.is_meta for p in model.parameters())


def test_meta_via_device_context():
    with torch.device("meta"):
        model = create_model("resnetv2_152x4_bit")
    assert millions(model) == PARAMS["resnetv2_152x4_bit"][1]
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "alias, canonical, release",
    [
        ("bit_r50x1", "resnetv2_50x1_bit", "BiT-M-R50x1-ILSVRC2012"),
        ("bit_m_r101x3", "resnetv2_101x3_bit", "BiT-M-R101x3"),
        ("bit_s_r152x4", "resnetv2_152x4_bit", "BiT-S-R152x4"),
        ("resnetv2_152x2_bit", "resnetv2_152x2_bit", "BiT-M-R152x2-ILSVRC2012"),
    ],
)
def test_aliases(alias, canonical, release):
    model = create_model(alias, device="meta")
    assert model.model_name == canonical
    assert default_release(alias) == release
    assert isinstance(model, ResNetV2)


def test_options_reach_the_layers():
    model = create_model("bit_r50x1", num_classes=3, ws_eps=1e-10, backend="reference", zero_head=True,
                         in_chans=1, device="meta")
    assert model.ws_eps == 1e-10 and model.stem.conv.eps == 1e-10
    assert model.stem.conv.backend == "reference" and model.norm.backend == "reference"
    assert model.stem.conv.in_channels == 1 and model.num_classes == 3
    bn = create_model("bit_r50x1", norm="BN", device="meta")
    assert bn.norm_kind == "bn"


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(name="resnet50"), ValueError, r"unknown model 'resnet50'.*resnetv2_50x1_bit.*resnetv2_152x4_bit"),
        (dict(num_classes=-1), ValueError, r"num_classes must be an int >= 0.*got -1"),
        (dict(num_classes=2.5), TypeError, r"num_classes must be an int >= 0; got 2.5"),
        (dict(num_classes=True), TypeError, r"num_classes"),
        (dict(norm="ln"), ValueError, r"norm must be one of \('gn', 'bn'\).*got 'ln'"),
        (dict(norm=None), TypeError, r"norm must be a str"),
        (dict(ws_eps=-1e-8), ValueError, r"ws_eps must be a finite float >= 0.*got -1e-08"),
        (dict(ws_eps="small"), TypeError, r"ws_eps must be a float >= 0; got 'small'"),
        (dict(backend="fast"), ValueError, r"unknown backend 'fast'; expected one of"),
        (dict(pretrained=3), TypeError, r"pretrained must be"),
        (dict(pretrained="BiT-L-R152x4"), ValueError, r"not a released BiT checkpoint"),
        (dict(layers=(1, 1, 1, 1)), TypeError, r"fixed by the model name"),
    ],
)
def test_argument_errors(kwargs, exc, pattern):
    name = kwargs.pop("name", "resnetv2_50x1_bit")
    with pytest.raises(exc, match=pattern):
        create_model(name, device="meta", **kwargs)


def test_pretrained_architecture_must_match_before_download(monkeypatch, tmp_path):
    # An unreachable mirror: the check must fire before any download is attempted.
    monkeypatch.setenv("BITFAST_WEIGHTS_URL", "http://127.0.0.1:9/none")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"'BiT-M-R101x1' is for R101x1 but the model is R50x1"):
        create_model("resnetv2_50x1_bit", pretrained="BiT-M-R101x1")
    with pytest.raises(ValueError, match=r"is for R152x4 but the model is R50x3"):
        create_model("resnetv2_50x3_bit", pretrained="https://example.invalid/x/BiT-S-R152x4.npz")
    with pytest.raises(ValueError, match="meta device"):
        create_model("resnetv2_50x1_bit", pretrained="BiT-M-R50x1", device="meta")
    assert not (tmp_path / "hub").exists()
