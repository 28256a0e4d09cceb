"""load_pretrained: the same weights in every supported format give identical logits; the
head rule; the report; and every error case (nothing is half-loaded)."""

import io
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bitfast import load_pretrained
from bitfast.checkpoint import LoadReport
from bitfast.models import ResNetV2

from .synth import authors_state, authors_training_checkpoint, npz_arrays, random_state

LAYERS = (2, 1, 1, 1)  # two units in stage 1, so unit02 / blocks.1 keys are exercised
K = 10
HEAD = ["head.fc.weight", "head.fc.bias"]


def fresh(num_classes=K, layers=LAYERS, seed=123, **kw) -> ResNetV2:
    torch.manual_seed(seed)
    return ResNetV2(layers, 1, num_classes=num_classes, **kw).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = fresh(seed=0)
    state = random_state(model)
    model.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(x)
    np.savez(d / "BiT-like.npz", **npz_arrays(state, LAYERS))
    np.savez(d / "half.npz", **npz_arrays(state, LAYERS, np.float16))
    torch.save(state, d / "timm.pth")
    torch.save(state, d / "pytorch_model.bin")
    save_file(state, str(d / "model.safetensors"))
    torch.save(authors_training_checkpoint(state, LAYERS), d / "bit.pth.tar")
    torch.save(authors_state(state, LAYERS), d / "authors.pth")
    return SimpleNamespace(dir=d, state=state, x=x, logits=logits)


FORMATS = [
    ("BiT-like.npz", "npz", "npz", False),
    ("half.npz", "npz", "npz", False),
    ("timm.pth", "timm", "torch", False),
    ("pytorch_model.bin", "timm", "torch", False),
    ("model.safetensors", "timm", "safetensors", False),
    ("bit.pth.tar", "authors", "torch", True),
    ("authors.pth", "authors", "torch", False),
]


@pytest.mark.parametrize("fname, layout, container, training", FORMATS)
def test_every_format_gives_identical_logits(src, fname, layout, container, training):
    model = fresh()
    report = load_pretrained(model, src.dir / fname)
    assert isinstance(report, LoadReport)
    assert (report.format, report.container, report.training_checkpoint) == (layout, container, training)
    assert report.head_loaded and not report.skipped_head and not report.missing and not report.unexpected
    assert sorted(report.loaded) == sorted(src.state)
    assert report.checkpoint_arch == "R?x1 (units 2,1,1,1)"
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.state[k]), k
    with torch.no_grad():
        assert torch.equal(model(src.x), src.logits)


def test_file_url_and_renamed_extension(src, tmp_path):
    model = fresh()
    load_pretrained(model, (src.dir / "timm.pth").as_uri())
    assert torch.equal(model.stem.conv.weight, src.state["stem.conv.weight"])
    # Content decides, not the extension: an .npz saved under a torch-like name.
    odd = tmp_path / "weights.ckpt"
    odd.write_bytes((src.dir / "BiT-like.npz").read_bytes())
    assert load_pretrained(fresh(), odd).format == "npz"
    noext = tmp_path / "weights"
    noext.write_bytes((src.dir / "model.safetensors").read_bytes())
    assert load_pretrained(fresh(), str(noext)).container == "safetensors"


def test_npz_scales_with_singleton_dims(src, tmp_path):
    arrays = npz_arrays(src.state, LAYERS)
    arrays = {k: (v.reshape(1, 1, 1, -1) if k.endswith(("gamma", "beta")) else v) for k, v in arrays.items()}
    np.savez(tmp_path / "w.npz", **arrays)
    model = fresh()
    load_pretrained(model, tmp_path / "w.npz")
    assert torch.equal(model.norm.weight, src.state["norm.weight"])


def test_casts_to_model_dtype(src):
    model = fresh().double()
    load_pretrained(model, src.dir / "half.npz")
    assert model.stem.conv.weight.dtype == torch.float64
    assert torch.equal(model.stem.conv.weight, src.state["stem.conv.weight"].double())


def test_looks_through_compile_wrapper(src):
    model = fresh()
    compiled = torch.compile(model)  # not run: loading must reach the original module
    load_pretrained(compiled, src.dir / "timm.pth")
    assert torch.equal(model.norm.bias, src.state["norm.bias"])


# ---------------------------------------------------------------------------------------
# The head rule
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fname", ["BiT-like.npz", "bit.pth.tar", "model.safetensors"])
def test_head_skipped_when_classes_differ(src, fname):
    model = fresh(num_classes=7)
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = load_pretrained(model, src.dir / fname)
    assert not report.head_loaded
    assert sorted(report.skipped_head) == sorted(HEAD)
    assert "10 classes" in report.head_note and "7" in report.head_note
    assert not report.missing and not report.unexpected
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head_before.items())
    assert torch.equal(model.stem.conv.weight, src.state["stem.conv.weight"])
    assert "head keeps its initialisation" in str(report)


def test_head_skipped_keeps_zero_init(src):
    model = ResNetV2(LAYERS, 1, num_classes=3, zero_head=True)
    load_pretrained(model, src.dir / "BiT-like.npz")
    assert model.head.fc.weight.abs().sum() == 0 and model.head.fc.bias.abs().sum() == 0


def test_model_without_head(src):
    model = fresh(num_classes=0)
    report = load_pretrained(model, src.dir / "timm.pth")
    assert sorted(report.skipped_head) == sorted(HEAD) and "no classifier" in report.head_note
    assert len(report.loaded) == len(src.state) - 2


def test_checkpoint_without_head(src, tmp_path):
    headless = {k: v for k, v in src.state.items() if not k.startswith("head.")}
    torch.save(headless, tmp_path / "headless.pth")
    model = fresh()
    init = model.head.fc.weight.clone()
    report = load_pretrained(model, tmp_path / "headless.pth")  # strict: the head is not "missing"
    assert not report.head_loaded and "no classifier" in report.head_note and not report.missing
    assert torch.equal(model.head.fc.weight, init)


# ---------------------------------------------------------------------------------------
# strict=False and the report
# ---------------------------------------------------------------------------------------


def test_strict_false_reports_gaps(src, tmp_path):
    partial = dict(src.state)
    del partial["stages.1.blocks.0.norm2.weight"]
    del partial["stages.3.blocks.0.conv3.weight"]
    partial["stages.9.blocks.0.conv1.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")

    model = fresh()
    snap = snapshot(model)
    with pytest.raises(ValueError) as err:
        load_pretrained(model, tmp_path / "partial.pth")
    msg = str(err.value)
    assert str(tmp_path / "partial.pth") in msg
    assert "missing keys (2)" in msg and "stages.1.blocks.0.norm2.weight" in msg
    assert "unexpected keys (1)" in msg and "stages.9.blocks.0.conv1.weight" in msg
    assert_unchanged(model, snap)

    report = load_pretrained(model, tmp_path / "partial.pth", strict=False)
    assert sorted(report.missing) == ["stages.1.blocks.0.norm2.weight", "stages.3.blocks.0.conv3.weight"]
    assert report.unexpected == ["stages.9.blocks.0.conv1.weight"]
    assert len(report.loaded) == len(src.state) - 2
    assert torch.equal(model.stages[1].blocks[0].norm2.weight, snap["stages.1.blocks.0.norm2.weight"])
    assert torch.equal(model.stages[1].blocks[0].norm1.weight, src.state["stages.1.blocks.0.norm1.weight"])
    text = str(report)
    assert "missing (2)" in text and "unexpected (1)" in text


def test_npz_unknown_keys_are_unexpected(src, tmp_path):
    arrays = npz_arrays(src.state, LAYERS)
    arrays["resnet/block1/unit01/b/proj/standardized_conv2d/kernel"] = np.zeros((1, 1, 4, 4), np.float32)
    arrays["resnet/global_step"] = np.zeros((), np.int64)
    np.savez(tmp_path / "extra.npz", **arrays)
    with pytest.raises(ValueError, match=r"unexpected keys \(2\).*resnet/"):
        load_pretrained(fresh(), tmp_path / "extra.npz")
    report = load_pretrained(fresh(), tmp_path / "extra.npz", strict=False)
    assert sorted(report.unexpected) == ["resnet/block1/unit01/b/proj/standardized_conv2d/kernel", "resnet/global_step"]


# ---------------------------------------------------------------------------------------
# Errors: nothing is half-loaded
# ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_pretrained(fresh(), path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(fresh(), str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("fname", ["BiT-like.npz", "timm.pth", "model.safetensors", "bit.pth.tar"])
def test_truncated_file(src, tmp_path, fname):
    data = (src.dir / fname).read_bytes()
    bad = tmp_path / fname
    bad.write_bytes(data[: len(data) // 2])
    model = fresh()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"truncated|corrupt") as err:
        load_pretrained(model, bad)
    assert str(bad) in str(err.value)
    assert_unchanged(model, snap)


def test_corrupt_npz_member(src, tmp_path):
    data = bytearray((src.dir / "BiT-like.npz").read_bytes())
    mid = len(data) // 2
    data[mid: mid + 64] = bytes(64)  # zip structure intact, one array's CRC broken
    bad = tmp_path / "crc.npz"
    bad.write_bytes(bytes(data))
    model = fresh()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"crc.npz.*(truncated or corrupt)"):
        load_pretrained(model, bad)
    assert_unchanged(model, snap)


def _zip_with_text(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")


@pytest.mark.parametrize(
    "name, make, pattern",
    [
        ("empty.pth", lambda p: p.write_bytes(b""), "empty"),
        ("notes.txt", lambda p: p.write_text("not weights\n"), "not a checkpoint"),
        ("garbage.pth", lambda p: p.write_bytes(bytes(range(256)) * 10), "not a readable torch.save"),
        ("archive.npz", _zip_with_text, "neither a .npz nor a torch.save"),
        ("list.pth", lambda p: torch.save([1, 2, 3], p), "holds a list"),
        ("linear.pth", lambda p: torch.save(torch.nn.Linear(2, 3).state_dict(), p), "not a BiT checkpoint"),
        ("arrays.npz", lambda p: np.savez(p, a=np.zeros(3), b=np.ones(2)), "not a BiT checkpoint"),
        ("strings.pth", lambda p: torch.save({"step": 3, "name": "x"}, p), "holds no tensors"),
    ],
)
def test_foreign_files(tmp_path, name, make, pattern):
    path = tmp_path / name
    make(path)
    model = fresh()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=pattern) as err:
        load_pretrained(model, path)
    assert name in str(err.value)
    assert_unchanged(model, snap)


def test_pickled_object_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": SimpleNamespace(a=1)}, path)  # needs weights_only=False to load
    with pytest.raises(ValueError, match="evil.pth"):
        load_pretrained(fresh(), path)


def test_other_architecture_shapes_named(src):
    wide = ResNetV2((1, 1, 1, 1), 2, num_classes=K)
    snap = snapshot(wide)
    with pytest.raises(ValueError, match="shape mismatches") as err:
        load_pretrained(wide, src.dir / "BiT-like.npz", strict=False)  # shapes fail even non-strict
    msg = str(err.value)
    assert "stem.conv.weight: checkpoint [64, 3, 7, 7] vs model [128, 3, 7, 7]" in msg
    assert "looks like R?x1" in msg and "BiT-like.npz" in msg
    assert_unchanged(wide, snap)


def test_other_depth_strict(src):
    shallow = fresh(layers=(1, 1, 1, 1))
    snap = snapshot(shallow)
    with pytest.raises(ValueError, match=r"unexpected keys \(9\): stages\.0\.blocks\.1\."):
        load_pretrained(shallow, src.dir / "bit.pth.tar")
    assert_unchanged(shallow, snap)
    deeper = fresh(layers=(2, 2, 1, 1))
    with pytest.raises(ValueError, match=r"missing keys \(9\): stages\.1\.blocks\.1\."):
        load_pretrained(deeper, src.dir / "timm.pth")
    one_channel = fresh(in_chans=1)
    with pytest.raises(ValueError, match=r"1 shape mismatches.*stem\.conv\.weight"):
        load_pretrained(one_channel, src.dir / "timm.pth")


def test_safetensors_needs_the_package(src, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_pretrained(fresh(), src.dir / "model.safetensors")


def test_bad_arguments(src):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        load_pretrained({"a": 1}, src.dir / "timm.pth")
    with pytest.raises(TypeError, match="path or a name"):
        load_pretrained(fresh(), 42)
    with pytest.raises(ValueError, match="meta device"):
        load_pretrained(ResNetV2(LAYERS, 1, num_classes=K, device="meta"), src.dir / "timm.pth")


# ---------------------------------------------------------------------------------------
# The BatchNorm variant
# ---------------------------------------------------------------------------------------


def test_bn_model_round_trip_and_gn_checkpoint(src, tmp_path):
    bn = ResNetV2(LAYERS, 1, num_classes=K, norm="bn")
    state = random_state(bn, seed=3)
    buf = io.BytesIO()
    torch.save(state, buf)
    (tmp_path / "bn.pth").write_bytes(buf.getvalue())
    other = ResNetV2(LAYERS, 1, num_classes=K, norm="bn")
    report = load_pretrained(other, tmp_path / "bn.pth")
    assert any(k.endswith("running_var") for k in report.loaded)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())

    # The official GroupNorm files have no running statistics.
    with pytest.raises(ValueError, match="running_mean"):
        load_pretrained(other, src.dir / "BiT-like.npz")
    report = load_pretrained(other, src.dir / "BiT-like.npz", strict=False)
    assert report.missing and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                                  for k in report.missing)
