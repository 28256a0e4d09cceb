"""bitfast.export / bitfast.compress: inference export parity, scripting and compiling,
loading without bitfast, magnitude pruning and int8 weight quantization."""

import copy
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitfast import ResNetV2
from bitfast.adapt import lora, lora_layers
from bitfast.export import for_inference, prune_magnitude, quantize_int8, write_plain_module
from bitfast.nn import BatchNormReLU, GroupNormReLU, StdConv2d
from bitfast.plain_model import Int8Conv2d, PlainResNetV2, ScaleShiftReLU


def _model(norm="gn", seed=0):
    """A small BiT with non-trivial norm parameters, running statistics and head."""
    torch.manual_seed(seed)
    m = ResNetV2((1, 1, 1, 1), base_width=32, num_classes=5, norm=norm)
    with torch.no_grad():
        m.head.fc.weight.normal_(0, 0.05)
        m.head.fc.bias.normal_(0, 0.1)
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
        for n, b in m.named_buffers():
            if n.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif n.endswith("running_mean"):
                b.normal_(0, 0.5)
    return m


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _script(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still supported
        return torch.jit.script(m)


def _jit_save(m, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(m, path)


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_export_parity_and_structure(norm):
    model = _model(norm).train()
    exported = for_inference(model)
    assert model.training and isinstance(model.stem.conv, StdConv2d)  # the original is untouched
    assert isinstance(exported, PlainResNetV2) and not exported.training
    assert json.loads(exported.config_json)["norm"] == norm
    for m in exported.modules():
        assert type(m).__module__.startswith("torch.nn") or type(m).__module__ == "bitfast.plain_model", type(m)
    assert all(not p.requires_grad for p in exported.parameters())
    # Standardization folded: the stored conv weight is the standardized one.
    w = exported.stem.conv.weight
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(w.shape[0]), atol=1e-6, rtol=0)
    if norm == "bn":
        blk = exported.stages[0].blocks[0]
        assert isinstance(blk.norm1, ScaleShiftReLU) and isinstance(blk.norm2, nn.ReLU)
        assert blk.conv1.bias is not None and blk.conv3.bias is None
    else:
        assert set(exported.state_dict()) == set(model.state_dict())

    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert _rel(exported(x), model(x)) < 1e-5


def test_export_lora_and_generic_models():
    model = lora(_model(), rank=2).eval()
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(0, 0.05)
    x = torch.randn(2, 3, 16, 16)
    exported = for_inference(model)
    assert isinstance(exported, PlainResNetV2)
    with torch.no_grad():
        assert _rel(exported(x), model(x)) < 1e-5

    seq = nn.Sequential(StdConv2d(3, 8, 3, bias=True), GroupNormReLU(8, 4), StdConv2d(8, 8, 3),
                        BatchNormReLU(8), nn.Flatten())
    with torch.no_grad():
        seq[3].running_mean.normal_()
        seq[3].running_var.uniform_(0.5, 2)
    seq.eval()
    out = for_inference(seq)
    assert [type(m).__name__ for m in out] == ["Conv2d", "PlainGroupNormReLU", "Conv2d", "ScaleShiftReLU", "Flatten"]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert _rel(out(x), seq(x)) < 1e-5
    single = for_inference(StdConv2d(3, 4, 3))
    assert type(single) is nn.Conv2d

    no_stats = nn.Sequential(BatchNormReLU(4, track_running_stats=False))
    with pytest.raises(ValueError, match="without running statistics"):
        for_inference(no_stats)
    with pytest.raises(TypeError, match="nn.Module"):
        for_inference({"weight": 1})


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_script_and_compile(norm):
    model = _model(norm).eval()
    exported = for_inference(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = exported(x)
        torch.testing.assert_close(_script(exported)(x), want)
        torch._dynamo.reset()
        compiled = torch.compile(exported, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want)


def test_loads_without_bitfast(tmp_path):
    model = _model("bn").eval()
    exported = for_inference(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        quant = copy.deepcopy(exported)
        quantize_int8(quant)
        want_q = quant(x)
    write_plain_module(tmp_path / "bitfast_plain_model.py")
    torch.save(exported.state_dict(), tmp_path / "model.pt")
    torch.save({"x": x, "want": want, "want_q": want_q}, tmp_path / "io.pt")
    (tmp_path / "config.json").write_text(exported.config_json)
    _jit_save(_script(quant), tmp_path / "quant_scripted.pt")

    code = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["bitfast"] = None  # bitfast may not be imported from here on
        sys.path = [{str(tmp_path)!r}] + [p for p in sys.path if p not in ("", ".")]
        try:
            import bitfast  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("bitfast is importable")
        import torch
        from bitfast_plain_model import PlainResNetV2
        cfg = json.load(open({str(tmp_path / "config.json")!r}))
        model = PlainResNetV2(**cfg)
        model.load_state_dict(torch.load({str(tmp_path / "model.pt")!r}), strict=True)
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            got = model(io["x"])
            got_q = torch.jit.load({str(tmp_path / "quant_scripted.pt")!r})(io["x"])
        err = ((got - io["want"]).norm() / io["want"].norm()).item()
        assert err < 1e-5, err
        torch.testing.assert_close(got_q, io["want_q"])
        loaded = [k for k, v in sys.modules.items() if k.startswith("bitfast") and v is not None]
        assert loaded == ["bitfast_plain_model"], loaded
        print("OK", err)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("OK")


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_is_exact(scope):
    exported = for_inference(_model("bn").eval())
    convs = {n: m for n, m in exported.named_modules() if type(m) is nn.Conv2d and not n.startswith("head")}
    before = {n: m.weight.clone() for n, m in convs.items()}
    calls = []
    report = prune_magnitude(exported, 0.37, scope=scope, eval_fn=lambda m: calls.append(1) or 0.5)
    assert len(calls) == 2 and report.metric_before == report.metric_after == 0.5
    total = sum(m.weight.numel() for m in convs.values())
    assert report.total == total and len(report.layers) == len(convs)
    if scope == "global":
        assert report.zeros == round(0.37 * total)
        pruned = torch.cat([before[n][m.weight == 0].abs() for n, m in convs.items()])
        kept = torch.cat([before[n][m.weight != 0].abs() for n, m in convs.items()])
        assert pruned.max() <= kept.min()  # the smallest magnitudes went
    else:
        for name, n, zeros, _ in report.layers:
            assert zeros == round(0.37 * n), name
    assert report.sparsity == pytest.approx(report.zeros / total)
    assert exported.head.fc.weight.ne(0).all()  # excluded by default
    assert "unstructured" in str(report)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_structured_pruning_zeroes_whole_channels(scope):
    exported = for_inference(_model("gn").eval())
    report = prune_magnitude(exported, 0.25, structured=True, scope=scope)
    convs = [m for n, m in exported.named_modules() if type(m) is nn.Conv2d and not n.startswith("head")]
    dead = [int((m.weight.flatten(1) == 0).all(dim=1).sum()) for m in convs]
    assert [c for *_, c in report.layers] == dead
    if scope == "layer":
        assert dead == [round(0.25 * m.out_channels) for m in convs]
    else:
        assert sum(dead) == round(0.25 * sum(m.out_channels for m in convs))
    for m in convs:  # no partially pruned channel
        row_zeros = (m.weight.flatten(1) == 0).sum(dim=1)
        assert ((row_zeros == 0) | (row_zeros == m.weight[0].numel())).all()


def test_pruning_errors():
    with pytest.raises(ValueError, match="standardizes conv weights.*for_inference"):
        prune_magnitude(_model(), 0.5)
    exported = for_inference(_model().eval())
    with pytest.raises(ValueError, match="amount"):
        prune_magnitude(exported, 1.5)
    with pytest.raises(ValueError, match="scope"):
        prune_magnitude(exported, 0.5, scope="model")
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        prune_magnitude(exported, 0.5, exclude=("*",))


def test_int8_quantization():
    model = _model("gn").eval()
    exported = for_inference(model)
    quant = copy.deepcopy(exported)
    report = quantize_int8(quant)
    n_layers = sum(type(m) is nn.Conv2d for m in exported.modules())
    assert len(report.layers) == n_layers and all(type(m) is not nn.Conv2d for m in quant.modules())
    assert isinstance(quant.stem.conv, Int8Conv2d) and quant.stem.conv.weight_int8.dtype == torch.int8
    assert report.weight_bytes_after < 0.26 * report.weight_bytes_before
    assert report.compression > 3.5 and "smaller" in str(report)
    # Per-channel symmetric: every channel uses the full range and the error is <= half a step.
    w, q = exported.stem.conv.weight, quant.stem.conv
    assert (q.weight_int8.flatten(1).abs().amax(dim=1) == 127).all()
    assert (q.dequantized_weight() - w).abs().max() <= q.weight_scale.max() / 2 + 1e-6

    torch.manual_seed(1)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        ref, got = exported(x), quant(x)
        torch.testing.assert_close(_script(quant)(x), got)
    assert F.cosine_similarity(got, ref, dim=1).min() > 0.97
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.8

    lin = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3, bias=False))
    want = lin(torch.ones(2, 6))
    rep = quantize_int8(lin, exclude=("2",))
    assert [r[0] for r in rep.layers] == ["0"] and type(lin[2]) is nn.Linear
    torch.testing.assert_close(lin(torch.ones(2, 6)), want, rtol=0.05, atol=0.02)

    with pytest.raises(ValueError, match="standardizes conv weights"):
        quantize_int8(_model())
    with pytest.raises(ValueError, match="nothing|no nn.Conv2d or nn.Linear"):
        quantize_int8(nn.Sequential(nn.ReLU()))


@pytest.mark.slow
def test_int8_accuracy_on_digits_after_training():
    """A proxy for the issue's criterion (int8 accuracy within 1 point of float after the
    demo's fine-tuning): a small BiT trained briefly on the embedded digits, then exported
    and quantized; test accuracy must stay within 1 point."""
    from bitfast.data.digits import DigitsDataset

    torch.manual_seed(0)
    train, test = DigitsDataset(split="train", resolution=16), DigitsDataset(split="test", resolution=16)
    x_tr, y_tr, x_te, y_te = train.images.contiguous(), train.targets, test.images.contiguous(), test.targets
    model = ResNetV2((1, 1, 1, 1), base_width=32, num_classes=10, zero_head=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(y_tr), (32,), generator=g)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    exported = for_inference(model)
    quant = copy.deepcopy(exported)
    quantize_int8(quant)

    def accuracy(m):
        with torch.no_grad():
            return 100.0 * (m(x_te).argmax(1) == y_te).float().mean().item()

    acc_float, acc_export, acc_int8 = accuracy(model), accuracy(exported), accuracy(quant)
    assert acc_float > 80.0, acc_float  # it learned something, so the comparison means something
    assert abs(acc_export - acc_float) < 0.5
    assert abs(acc_int8 - acc_float) <= 1.0, (acc_float, acc_int8)
