"""create_model / list_models: names, parameter counts of the six BiT architectures
(the table of docs/bit.md, on the meta device), the registered ``bit_tiny`` and argument errors."""

import pytest
import torch

import bitfast
from bitfast.models import MODEL_SPECS, MODELS, ResNetV2, create_model, default_release, list_models

# arch -> (backbone, with 1000-class head, with 21843-class head), in millions (docs/bit.md)
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
    assert list_models() == [*PARAMS, "bit_tiny"]
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
        (dict(ws_eps=-1e-8), ValueError, r"ws_eps must be a finite value >= 0; got -1e-08"),
        (dict(ws_eps="small"), TypeError, r"ws_eps must be a float; got str"),
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


# bit_tiny: not a BiT architecture, a 2M-parameter BiT-style net for CPUs without releases.
TINY_PARAMS = {0: 2_007_328, 5: 2_012_453, 1000: 3_032_328}


def test_bit_tiny_is_registered():
    assert "bit_tiny" in list_models() and "bit_tiny" in list_models(include_aliases=True)
    assert list_models()[-1] == "bit_tiny"  # after the BiT family
    assert "bit_tiny" in bitfast.list_models()
    spec = MODEL_SPECS["bit_tiny"]
    assert (spec.units, spec.width_factor, spec.base_width, spec.release_arch) == ((1, 1, 1, 1), 1, 32, None)
    assert "2M-parameter" in spec.description and "CPU" in spec.description
    assert "not a released BiT architecture" in spec.description
    assert "bit_tiny" not in MODELS  # MODELS keeps its (depth, width) shape: the BiT family only
    assert all(MODEL_SPECS[n].release_arch == f"R{d}x{w}" for n, (d, w) in MODELS.items())


@pytest.mark.parametrize("norm", ["gn", "bn"])
@pytest.mark.parametrize("zero_head", [False, True])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_bit_tiny_is_resnetv2_1111_width_32_bitwise(norm, zero_head, num_classes):
    torch.manual_seed(1234)
    model = create_model("bit_tiny", num_classes=num_classes, norm=norm, zero_head=zero_head)
    torch.manual_seed(1234)
    ref = ResNetV2((1, 1, 1, 1), base_width=32, num_classes=num_classes, norm=norm, zero_head=zero_head)
    assert type(model) is ResNetV2 and model.model_name == "bit_tiny" and model.pretrained_report is None
    assert model.layers == (1, 1, 1, 1) and model.base_width == 32 and model.width_factor == 1
    assert model.norm_kind == norm and model.num_classes == num_classes and model.arch == "R?x1-w32"
    assert repr(model) == repr(ref)
    got, want = model.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert sum(p.numel() for p in model.parameters()) == TINY_PARAMS[num_classes]
    # and the same draws leave the generator in the same state
    torch.manual_seed(7)
    create_model("bit_tiny", num_classes=num_classes, norm=norm, zero_head=zero_head)
    after_create = torch.rand(3)
    torch.manual_seed(7)
    ResNetV2((1, 1, 1, 1), base_width=32, num_classes=num_classes, norm=norm, zero_head=zero_head)
    assert torch.equal(after_create, torch.rand(3))


def test_bit_tiny_runs_and_takes_the_options():
    model = create_model(" BIT_Tiny ", num_classes=5, norm="BN", backend="reference", in_chans=1)
    assert model.model_name == "bit_tiny" and model.norm_kind == "bn"
    assert model.stem.conv.backend == "reference" and model.stem.conv.in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    via_top = bitfast.create_model("bit_tiny", num_classes=5)
    assert via_top.model_name == "bit_tiny" and via_top.norm_kind == "gn"
    assert millions(create_model("bit_tiny", num_classes=1000, device="meta")) == 3.03


def test_bit_tiny_has_no_released_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("BITFAST_WEIGHTS_URL", "http://127.0.0.1:9/none")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    msg = r"there are no released weights for bit_tiny .*2M-parameter.*pass pretrained=<path"
    with pytest.raises(ValueError, match=msg):
        create_model("bit_tiny", num_classes=5, pretrained=True)
    with pytest.raises(ValueError, match=msg):
        default_release("bit_tiny")
    with pytest.raises(ValueError, match=msg + r".*'BiT-M-R50x1' is for R50x1"):
        create_model("bit_tiny", pretrained="BiT-M-R50x1")
    with pytest.raises(ValueError, match=msg):
        create_model("bit_tiny", pretrained="https://example.invalid/x/BiT-S-R50x1.npz")
    assert create_model("bit_tiny", pretrained=False).pretrained_report is None
    assert not (tmp_path / "hub").exists()


@pytest.mark.parametrize("wrap", [False, True])
def test_bit_tiny_pretrained_from_a_file(tmp_path, wrap):
    torch.manual_seed(0)
    src = ResNetV2((1, 1, 1, 1), base_width=32, num_classes=5)
    path = tmp_path / "tiny.pt"
    state = src.state_dict()
    torch.save({"model": state, "step": 3} if wrap else state, path)
    torch.manual_seed(1)
    model = create_model("bit_tiny", num_classes=5, pretrained=str(path))
    assert model.model_name == "bit_tiny" and model.pretrained_report is not None
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    fresh_head = create_model("bit_tiny", num_classes=3, pretrained=path)  # an os.PathLike
    assert torch.equal(fresh_head.stem.conv.weight, src.stem.conv.weight)
    wide = tmp_path / "wide.pt"  # a checkpoint of another (wider) architecture
    torch.save(ResNetV2((1, 1, 1, 1), base_width=64, num_classes=5).state_dict(), wide)
    with pytest.raises(ValueError, match="shape"):
        create_model("bit_tiny", num_classes=5, pretrained=str(wide))
