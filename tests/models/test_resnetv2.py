"""ResNetV2: architecture against docs/bit.md (the network), timm key names, shapes, heads,
memory formats, autocast and the BatchNorm variant."""

import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitfast
from bitfast.models import ResNetV2, create_model
from bitfast.nn import BatchNormReLU, GroupNormReLU, StdConv2d

TINY = (1, 1, 1, 1)  # every stage present (so every stride and projection), one unit each


def tiny(**kw) -> ResNetV2:
    kw.setdefault("num_classes", 10)
    return ResNetV2(TINY, 1, **kw)


def randomize_(model: nn.Module) -> nn.Module:
    """Non-trivial norm affines and head (the default init has ones/zeros and tiny logits)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm3.weight") or name == "norm.weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name == "head.fc.weight":
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------
# The spec, written out functionally from docs/bit.md (the network), reading the parameters by
# their timm names: the model must compute exactly this.
# ---------------------------------------------------------------------------------------


def _ws(w, eps):
    w = w.double()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (w - mean) / torch.sqrt(var + eps)


def spec_forward(model: ResNetV2, x: torch.Tensor, norm: str = "gn") -> torch.Tensor:
    sd = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    eps = model.ws_eps
    x = x.double()

    def conv(name, t, stride=1, pad=0):
        return F.conv2d(t, _ws(sd[name + ".weight"], eps), None, stride, pad)

    def act(name, t):
        if norm == "gn":
            t = F.group_norm(t, 32, sd[name + ".weight"], sd[name + ".bias"], 1e-5)
        else:
            t = F.batch_norm(t, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                             sd[name + ".bias"], False, 0.0, 1e-5)
        return F.relu(t)

    x = conv("stem.conv", x, 2, 3)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=0.0), 3, 2)
    for i, depth in enumerate(model.layers):
        for j in range(depth):
            u = f"stages.{i}.blocks.{j}"
            stride = 2 if (i > 0 and j == 0) else 1
            p = act(u + ".norm1", x)
            sc = conv(u + ".downsample.conv", p, stride) if j == 0 else x
            y = conv(u + ".conv1", p)
            y = conv(u + ".conv2", act(u + ".norm2", y), stride, 1)
            y = conv(u + ".conv3", act(u + ".norm3", y))
            x = y + sc
    x = act("norm", x).mean(dim=(2, 3), keepdim=True)
    return F.conv2d(x, sd["head.fc.weight"], sd["head.fc.bias"]).flatten(1)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_matches_spec_forward(backend):
    model = randomize_(tiny(backend=backend)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    ref = spec_forward(model, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_unit_order_and_projection_placement():
    model = ResNetV2((3, 4, 6, 3), 1, device="meta")
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            assert (block.downsample is not None) == (j == 0)
            stride = 2 if (i > 0 and j == 0) else 1
            assert block.conv2.stride == (stride, stride) and block.conv2.padding == (1, 1)
            assert block.conv1.stride == (1, 1) and block.conv3.stride == (1, 1)
            if j == 0:
                assert block.downsample.conv.stride == (stride, stride)
                assert block.downsample.conv.kernel_size == (1, 1)
            assert block.conv1.in_channels == block.norm1.num_channels
    assert model.stem.conv.kernel_size == (7, 7) and model.stem.conv.stride == (2, 2)
    assert model.stem.conv.padding == (3, 3)
    assert [type(m) for m in model.stem] == [StdConv2d, nn.ConstantPad2d, nn.MaxPool2d]
    assert model.stem.pool.padding == 0 and model.stem.pad.padding == (1, 1, 1, 1)
    assert model.stem.pad.value == 0.0


# ---------------------------------------------------------------------------------------
# Key names (docs/bit.md, parameter names)
# ---------------------------------------------------------------------------------------


def expected_keys(layers, head=True):
    keys = ["stem.conv.weight"]
    for i, depth in enumerate(layers):
        for j in range(depth):
            u = f"stages.{i}.blocks.{j}"
            if j == 0:
                keys.append(f"{u}.downsample.conv.weight")
            for k in (1, 2, 3):
                keys += [f"{u}.norm{k}.weight", f"{u}.norm{k}.bias", f"{u}.conv{k}.weight"]
    keys += ["norm.weight", "norm.bias"]
    if head:
        keys += ["head.fc.weight", "head.fc.bias"]
    return keys


@pytest.mark.parametrize(
    "name, layers, count",
    [
        ("resnetv2_50x1_bit", (3, 4, 6, 3), 153),
        ("resnetv2_101x3_bit", (3, 4, 23, 3), 306),
        ("resnetv2_152x2_bit", (3, 8, 36, 3), 459),
    ],
)
def test_state_dict_keys_are_timm(name, layers, count):
    model = create_model(name, device="meta")
    sd = model.state_dict()
    assert len(sd) == count
    assert sorted(sd) == sorted(expected_keys(layers))
    wf = model.width_factor
    assert tuple(sd["head.fc.weight"].shape) == (1000, 2048 * wf, 1, 1)
    assert tuple(sd["head.fc.bias"].shape) == (1000,)
    assert tuple(sd["stem.conv.weight"].shape) == (64 * wf, 3, 7, 7)
    for i in range(4):
        cin = 64 * wf if i == 0 else 256 * 2 ** (i - 1) * wf
        cout, cmid = 256 * 2**i * wf, 64 * 2**i * wf
        u = f"stages.{i}.blocks.0"
        assert tuple(sd[f"{u}.downsample.conv.weight"].shape) == (cout, cin, 1, 1)
        assert tuple(sd[f"{u}.norm1.weight"].shape) == (cin,)
        assert tuple(sd[f"{u}.conv1.weight"].shape) == (cmid, cin, 1, 1)
        assert tuple(sd[f"{u}.conv2.weight"].shape) == (cmid, cmid, 3, 3)
        assert tuple(sd[f"{u}.norm3.weight"].shape) == (cmid,)
        assert tuple(sd[f"{u}.conv3.weight"].shape) == (cout, cmid, 1, 1)


def test_bn_variant_keys_add_running_stats():
    model = create_model("resnetv2_50x1_bit", norm="bn", device="meta")
    sd = model.state_dict()
    params = expected_keys((3, 4, 6, 3))
    norms = sorted({k.rsplit(".", 1)[0] for k in params if re.search(r"norm\d?\.weight$", k)})
    assert len(norms) == 16 * 3 + 1
    stats = [f"{n}.{b}" for n in norms for b in ("running_mean", "running_var", "num_batches_tracked")]
    assert sorted(sd) == sorted(params + stats)
    assert len(sd) == 153 + 3 * 49
    assert all(isinstance(m, BatchNormReLU) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn = model.norm
    assert bn.eps == 1e-5 and bn.momentum == 0.1


# ---------------------------------------------------------------------------------------
# Stem padding
# ---------------------------------------------------------------------------------------


def test_stem_zero_pad_differs_from_maxpool_padding_when_negative():
    """ConstantPad2d(1, 0) + MaxPool2d(3, 2) clamps border windows at 0; MaxPool2d(padding=1)
    pads with -inf, so the two differ exactly where a border window is all negative."""
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    # Make the stem conv output negative everywhere (it has no norm and no ReLU, so the
    # released models do produce negative stem outputs).
    handle = model.stem.conv.register_forward_hook(lambda mod, inp, out: out - out.abs().max() - 1.0)
    with torch.no_grad():
        conv_out = model.stem.conv(x)
        stem_out = model.stem(x)
    handle.remove()
    assert (conv_out < 0).all()
    expected = F.max_pool2d(F.pad(conv_out, (1, 1, 1, 1), value=0.0), 3, 2)
    other = F.max_pool2d(conv_out, 3, 2, padding=1)
    assert torch.equal(stem_out, expected)
    assert stem_out.shape == other.shape == (1, 64, 16, 16)
    differ = (stem_out != other).any(dim=(0, 1))
    border = torch.zeros_like(differ)
    border[0, :] = True
    border[:, 0] = True
    # Windows start at 0, 2, ...: only the first row/column of windows reaches a pad cell.
    assert torch.equal(differ, border)
    assert (stem_out[..., 0, :] == 0).all() and (other[..., 0, :] < 0).all()
    # Interior windows never touch the padding: identical.
    assert torch.equal(stem_out[..., 1:, 1:], other[..., 1:, 1:])


def test_stem_spatial_sizes():
    model = create_model("resnetv2_50x1_bit", device="meta")
    x = torch.empty(1, 3, 224, 224, device="meta")
    assert model.stem.conv(x).shape[-2:] == (112, 112)
    assert model.stem.pad(model.stem.conv(x)).shape[-2:] == (114, 114)
    assert model.stem(x).shape[-2:] == (56, 56)


# ---------------------------------------------------------------------------------------
# Shapes and heads
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, fmap", [(224, 7), (128, 4), (480, 15)])
def test_feature_map_sizes(size, fmap):
    model = create_model("resnetv2_50x1_bit", device="meta")
    feats = model.forward_features(torch.empty(2, 3, size, size, device="meta"))
    assert tuple(feats.shape) == (2, 2048, fmap, fmap)
    assert tuple(model(torch.empty(2, 3, size, size, device="meta")).shape) == (2, 1000)


def test_r50x1_forward_224_real():
    model = create_model("resnetv2_50x1_bit", num_classes=5).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 224, 224))
        logits = model.forward_head(feats)
    assert feats.shape == (1, 2048, 7, 7) and logits.shape == (1, 5)
    assert (feats >= 0).all()  # the final norm is followed by ReLU
    assert torch.isfinite(logits).all()


def test_num_classes_zero_returns_pooled_features():
    model = tiny(num_classes=0).eval()
    assert model.num_classes == 0 and isinstance(model.head.fc, nn.Identity)
    assert "head.fc.weight" not in model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
    assert out.shape == (2, model.num_features) == (2, 2048)
    torch.testing.assert_close(out, feats.mean(dim=(2, 3)))


def test_forward_head_pre_logits():
    model = randomize_(tiny()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
    assert pre.shape == (2, 2048)
    torch.testing.assert_close(pre, feats.mean(dim=(2, 3)))
    fc = model.head.fc
    torch.testing.assert_close(logits, pre @ fc.weight.flatten(1).T + fc.bias)


def test_reset_classifier():
    model = tiny(num_classes=10)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.head.fc.weight.shape == (3, 2048, 1, 1)
    assert model.head.fc.bias.abs().sum() == 0 and model.head.fc.weight.abs().sum() > 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    model.reset_classifier(4, zero_head=True)
    assert model.head.fc.weight.abs().sum() == 0
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2048)
    zero = tiny(zero_head=True)
    zero.reset_classifier(6)
    assert zero.head.fc.weight.abs().sum() == 0  # follows the model's zero_head
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    double = tiny().double()
    double.reset_classifier(2)
    assert double.head.fc.weight.dtype == torch.float64


def test_init():
    model = create_model("resnetv2_50x1_bit", num_classes=1000)
    fc = model.head.fc
    assert abs(fc.weight.std().item() - 0.01) < 5e-4 and fc.bias.abs().sum() == 0
    zero = tiny(zero_head=True)
    assert zero.head.fc.weight.abs().sum() == 0 and zero.head.fc.bias.abs().sum() == 0
    conv = model.stages[3].blocks[1].conv2  # fan_out = 512 * 9
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected - 1) < 0.02
    for m in model.modules():
        if isinstance(m, GroupNormReLU):
            assert (m.weight == 1).all() and (m.bias == 0).all()


def test_injected_layers_and_options():
    model = tiny(ws_eps=1e-10, backend="reference")
    convs = [m for m in model.modules() if isinstance(m, StdConv2d)]
    assert len(convs) == 1 + 4 * 3 + 4
    assert all(c.eps == 1e-10 and c.backend == "reference" and c.bias is None for c in convs)
    norms = [m for m in model.modules() if isinstance(m, GroupNormReLU)]
    assert len(norms) == 4 * 3 + 1 and all(n.num_groups == 32 and n.eps == 1e-5 and n.backend == "reference" for n in norms)

    # Any factories: here plain torch layers.
    plain = ResNetV2(
        TINY, 1, num_classes=4,
        conv_layer=functools.partial(nn.Conv2d, bias=False),
        norm_layer=lambda c: nn.Sequential(nn.GroupNorm(32, c), nn.ReLU()),
    )
    assert not any(isinstance(m, (StdConv2d, GroupNormReLU)) for m in plain.modules())
    assert plain(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_backends_agree_at_model_level():
    a = randomize_(tiny(backend="reference")).eval()
    b = tiny().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)
        with bitfast.use_backend("reference"):
            torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_bad_input_and_arguments():
    model = tiny()
    with pytest.raises(ValueError, match=r"expected \(N, 3, H, W\)"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="layers"):
        ResNetV2((3, 4, 6), 1)
    with pytest.raises(ValueError, match="width_factor"):
        ResNetV2(TINY, 0)
    with pytest.raises(ValueError, match="norm"):
        ResNetV2(TINY, 1, norm="ln")
    with pytest.raises(ValueError, match="backend"):
        ResNetV2(TINY, 1, backend="fast")


# ---------------------------------------------------------------------------------------
# Memory format, autocast, BatchNorm variant
# ---------------------------------------------------------------------------------------


def test_channels_last_matches_nchw():
    model = randomize_(tiny()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        feats_ref = model.forward_features(x)
        model = model.to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        out = model(xc)
        feats = model.forward_features(xc)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats, feats_ref, rtol=1e-4, atol=1e-4)

    # And in training (backward through the channels_last graph).
    model.train()
    loss = model(xc).square().sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_autocast(dtype, tol):
    model = randomize_(tiny()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        pre_ref = model.forward_head(model.forward_features(x), pre_logits=True)
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
            pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert ((pre.float() - pre_ref).norm() / pre_ref.norm()).item() < tol
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2 * tol
    # Parameters stay float32 (autocast casts copies).
    assert model.stem.conv.weight.dtype == torch.float32

    # A training step under autocast produces finite float32 gradients.
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert model.stem.conv.weight.grad.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bn_variant_train_and_eval():
    model = ResNetV2((2, 1, 1, 1), 1, norm="bn", num_classes=4)
    assert model.norm_kind == "bn" and isinstance(model.norm, BatchNormReLU)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    before = model.stages[0].blocks[0].norm1.running_mean.clone()
    train_out = model(x)
    bn = model.stages[0].blocks[0].norm1
    assert bn.num_batches_tracked.item() == 1
    assert not torch.equal(bn.running_mean, before)
    train_out.sum().backward()
    assert torch.isfinite(model.stem.conv.weight.grad).all()

    # Calibrate the running statistics on x (momentum 1: they become x's batch statistics)
    # so that eval-mode activations stay well scaled, then check eval against the spec.
    randomize_(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNormReLU):
                m.momentum = 1.0
        model(x)
        model.eval()
        out = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        single = model.forward_head(model.forward_features(x[:1]), pre_logits=True)
        ref = spec_forward(model, x, norm="bn")
        tracked = model.norm.num_batches_tracked.item()
        model(x)
        assert model.norm.num_batches_tracked.item() == tracked  # eval does not update
    torch.testing.assert_close(single, pre[:1], rtol=1e-4, atol=1e-4)  # eval: per-sample
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_base_width_builds_a_narrow_bit_network():
    model = ResNetV2((1, 1, 1, 1), base_width=32, num_classes=5)
    assert model.arch == "R?x1-w32"
    assert model.stem.conv.weight.shape[0] == 32
    assert model.num_features == 1024
    assert [s.blocks[0].conv3.weight.shape[0] for s in model.stages] == [128, 256, 512, 1024]
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    with pytest.raises(ValueError, match="base_width"):
        ResNetV2((1, 1, 1, 1), base_width=0)
