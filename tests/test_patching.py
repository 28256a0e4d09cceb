"""bitfast.patch: swapping timm-style and plain torch layers for bitfast's fused ones.

The "timm-style" classes below are written here from plain torch modules, with timm's class
names, attributes and math (weight standardization through ``F.batch_norm`` with eps inside
the square root; norm, then drop, then act), so the tests run without timm; one test patches
timm's own model when timm is installed.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitfast
import bitfast.patching as bpatch
from bitfast import ResNetV2
from bitfast.nn import BatchNormReLU, GroupNormReLU
from bitfast.nn import StdConv2d as BitfastStdConv2d
from bitfast.optim import FusedSGD

# --------------------------------------------------------------------------------------
# timm-shaped layers, written from plain torch
# --------------------------------------------------------------------------------------


def _bn_standardize(w, eps):
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=eps).reshape_as(w)


class StdConv2d(nn.Conv2d):
    def __init__(self, in_chs, out_chs, kernel_size, stride=1, padding=None, dilation=1, groups=1, bias=False,
                 eps=1e-6):
        if padding is None:
            padding = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias)
        self.eps = eps

    def forward(self, x):
        w = _bn_standardize(self.weight, self.eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2dSame(StdConv2d):
    def __init__(self, in_chs, out_chs, kernel_size, stride=1, eps=1e-6):
        self_static = stride == 1 and (kernel_size - 1) % 2 == 0
        super().__init__(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2 if self_static else 0, eps=eps)
        self.same_pad = not self_static

    def forward(self, x):
        if self.same_pad:
            ih, iw = x.shape[-2:]
            k, s = self.kernel_size[0], self.stride[0]
            ph = max((-(-ih // s) - 1) * s + k - ih, 0)
            pw = max((-(-iw // s) - 1) * s + k - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class ScaledStdConv2d(nn.Conv2d):
    def __init__(self, in_chs, out_chs, kernel_size, eps=1e-6):
        super().__init__(in_chs, out_chs, kernel_size, padding=kernel_size // 2)
        self.gain = nn.Parameter(torch.ones(out_chs, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _EpsOutsideSqrt(StdConv2d):
    """An older WS variant: eps added to the standard deviation, not inside the sqrt."""

    def forward(self, x):
        std, mean = torch.std_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (self.weight - mean) / (std + self.eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


_EpsOutsideSqrt.__name__ = "StdConv2d"  # looks like timm's by name; only the numbers tell


class GroupNormAct(nn.GroupNorm):
    def __init__(self, num_channels, num_groups=32, eps=1e-5, affine=True, act_layer=nn.ReLU, drop_layer=None):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, act_layer=nn.ReLU):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = nn.Identity()
        self.act = act_layer(inplace=True) if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _timm_like(norm="gn", ws_eps=1e-8):
    norm_layer = functools.partial(GroupNormAct, num_groups=32) if norm == "gn" else BatchNormAct2d
    return ResNetV2((1, 1, 1, 1), base_width=32, num_classes=5, conv_layer=functools.partial(StdConv2d, eps=ws_eps),
                    norm_layer=norm_layer)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_rel(a, b, tol=1e-4, msg=""):
    """Relative error in the norm: fp32 rounding differs elementwise between the two
    implementations (both are about 1e-5 from a float64 run), not in aggregate."""
    err = _rel(a, b)
    assert err < tol, f"{msg}: relative error {err:.2e}"


def _assert_as_close_to_exact(fast, ref, exact, msg="", floor=1e-5):
    """bitfast's rule: ``fast`` is within twice ``ref``'s own error against the float64
    ``exact`` (plus a floor), in the norm."""
    e_fast, e_ref = _rel(fast, exact), _rel(ref, exact)
    assert e_fast <= 2 * e_ref + floor, f"{msg}: error {e_fast:.2e} vs the unpatched model's {e_ref:.2e}"


def _run(model, x, y):
    model.zero_grad()
    out = model(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["gn", "bn"])
@pytest.mark.parametrize("train", [True, False])
def test_timm_like_bit_parity(norm, train):
    model = _timm_like(norm)
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 0.05)
        for n, b in model.named_buffers():
            if n.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}

    report = bitfast.patch(model)

    # Every conv and norm swapped, nothing left, same Parameter objects and state dict.
    n_conv = sum(isinstance(m, StdConv2d) for m in ref.modules())
    n_norm = sum(isinstance(m, (GroupNormAct, BatchNormAct2d)) for m in ref.modules())
    assert len(report.replaced) == n_conv + n_norm and not report.left
    assert {r.new for r in report.replaced} == {"StdConv2d", "GroupNormReLU" if norm == "gn" else "BatchNormReLU"}
    assert type(model.stages[0].blocks[0].conv2) is BitfastStdConv2d
    assert model.stages[0].blocks[0].conv2.eps == 1e-8
    assert all(p is params[n] for n, p in model.named_parameters())
    sd = model.state_dict()
    assert list(sd) == list(before_sd)
    assert all(torch.equal(sd[k], before_sd[k]) for k in sd)

    model.train(train)
    ref.train(train)
    exact = copy.deepcopy(ref).double()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out_ref, g_ref = _run(ref, x, y)
    out, g = _run(model, x, y)
    out64, g64 = _run(exact, x.double(), y)
    # a coarse check, then the real one: float32 rounding differs between the kernels
    # (vector widths, summation orders) and a training-mode BatchNorm net amplifies it
    torch.testing.assert_close(out, out_ref, rtol=1e-3, atol=1e-4)
    _assert_as_close_to_exact(out, out_ref, out64, msg="logits")
    for n in g_ref:
        _assert_as_close_to_exact(g[n], g_ref[n], g64[n], msg=n)
    if norm == "bn":
        sd64 = exact.state_dict()
        for k, v in ref.state_dict().items():  # running statistics updated alike
            _assert_as_close_to_exact(model.state_dict()[k].double(), v.double(), sd64[k].double(), msg=k)


def test_patch_is_idempotent_and_bitfast_models_need_nothing():
    model = _timm_like()
    bitfast.patch(model)
    again = bitfast.patch(model)
    assert not again.replaced and not again.left and len(again.already) > 0
    assert not bitfast.patch(ResNetV2((1, 1, 1, 1), base_width=32, num_classes=5)).replaced


def test_plain_norm_relu_pairs_in_sequential():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.GroupNorm(2, 8),  # no ReLU after it: left, not refused
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    keys = list(model.state_dict())
    ref = copy.deepcopy(model)
    report = bpatch.patch(model, backend="reference")
    assert [(r.name, r.new) for r in report.replaced] == [("1", "GroupNormReLU"), ("4", "BatchNormReLU")]
    assert [(x.name, x.refused) for x in report.left] == [("6", False)]
    assert isinstance(model[1], GroupNormReLU) and model[1].backend == "reference"
    assert isinstance(model[4], BatchNormReLU)
    assert isinstance(model[2], nn.Identity) and isinstance(model[5], nn.Identity)
    assert list(model.state_dict()) == keys
    model.load_state_dict(ref.state_dict())  # old checkpoints load as they are
    x = torch.randn(4, 3, 6, 6)
    for train in (True, False):
        model.train(train)
        ref.train(train)
        out_ref, g_ref = _run_plain(ref, x)
        out, g = _run_plain(model, x)
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
        for n in g_ref:
            _assert_rel(g[n], g_ref[n], msg=n)
    torch.testing.assert_close(model[4].running_mean, ref[4].running_mean)


def _run_plain(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_static_same_conv_is_replaced_dynamic_is_refused():
    model = nn.Sequential(StdConv2dSame(3, 4, 3, stride=1), StdConv2dSame(4, 4, 3, stride=2))
    with pytest.raises(bpatch.PatchError, match=r"1 \(StdConv2dSame\): .*pads dynamically"):
        bitfast.patch(model)
    assert type(model[0]) is StdConv2dSame  # strict refusal changes nothing
    ref = copy.deepcopy(model)
    report = bitfast.patch(model, strict=False)
    assert [r.name for r in report.replaced] == ["0"] and [x.name for x in report.refused] == ["1"]
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_refusals():
    model = nn.Sequential(
        StdConv2d(3, 8, 3),
        GroupNormAct(8, num_groups=2, act_layer=nn.SiLU),
        _EpsOutsideSqrt(8, 8, 3, eps=1e-3),
        ScaledStdConv2d(8, 8, 3),
        GroupNormAct(8, num_groups=2, drop_layer=lambda: nn.Dropout(0.1)),
        BatchNormAct2d(8),
    )
    with pytest.raises(bpatch.PatchError) as err:
        bitfast.patch(model)
    msg = str(err.value)
    assert "4 module(s) of Sequential cannot be replaced exactly" in msg
    assert "1 (GroupNormAct): GroupNormAct.act is SiLU" in msg
    assert "2 (StdConv2d): its output differs" in msg and "eps outside the square root" in msg
    assert "3 (ScaledStdConv2d)" in msg and "gain" in msg
    assert "4 (GroupNormAct): GroupNormAct.drop is Dropout" in msg
    assert "strict=False" in msg

    report = bitfast.patch(model, strict=False)
    assert [r.name for r in report.replaced] == ["0", "5"]
    assert sorted(x.name for x in report.refused) == ["1", "2", "3", "4"]
    assert type(model[1]) is GroupNormAct and type(model[2]) is _EpsOutsideSqrt
    assert "left 2 (StdConv2d) [refused]" in str(report)


def test_hooks_are_refused():
    model = nn.Sequential(StdConv2d(3, 4, 3))
    model[0].register_forward_hook(lambda *a: None)
    with pytest.raises(bpatch.PatchError, match="hooks"):
        bitfast.patch(model)


def test_unsupported_model_explains_what_it_found():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(bpatch.PatchError, match=r"found nothing to replace in Sequential \(modules: 2 Linear, .*ReLU"):
        bitfast.patch(mlp)
    assert not bitfast.patch(mlp, strict=False).replaced
    with pytest.raises(TypeError, match="nn.Module"):
        bitfast.patch("resnet")
    with pytest.raises(Exception, match="nope"):
        bitfast.patch(_timm_like(), backend="nope")


def test_fused_optimizer_continues_the_sgd_run():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    b = copy.deepcopy(a)
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": 0.05}]  # noqa: E731
    opt_a = torch.optim.SGD(groups(a), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_b = torch.optim.SGD(groups(b), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x = torch.randn(5, 4)

    def step(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    for _ in range(2):
        step(a, opt_a)
        step(b, opt_b)
    fused = bpatch.fused_optimizer(opt_b, backend="reference")
    assert isinstance(fused, FusedSGD)
    assert [g["lr"] for g in fused.param_groups] == [0.1, 0.05]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 1e-3 for g in fused.param_groups)
    for p in b.parameters():
        torch.testing.assert_close(fused.state[p]["momentum_buffer"], opt_b.state[p]["momentum_buffer"])
    for _ in range(3):
        step(a, opt_a)
        step(b, fused)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="expected a torch.optim.SGD; got Adam"):
        bpatch.fused_optimizer(torch.optim.Adam(a.parameters()))


def test_timm_model_itself():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=5).eval()
    ref = copy.deepcopy(model)
    report = bitfast.patch(model)
    assert len(report.replaced) > 0 and not report.refused
    assert set(model.state_dict()) == set(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-3, atol=1e-4)
