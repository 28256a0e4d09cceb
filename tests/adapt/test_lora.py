"""bitfast.adapt: LoRA on weight-standardized convs (zero-init identity, merge/unmerge,
gradients only to the factors, training, state dicts, bad input)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from bitfast import ResNetV2
from bitfast.adapt import (
    LoRAStdConv2d,
    load_lora_state_dict,
    lora,
    lora_layers,
    lora_parameters,
    lora_report,
    lora_state_dict,
    merge,
    unmerge,
    unwrap,
)
from bitfast.nn import GroupNormReLU, StdConv2d
from bitfast.ops import reference


def _model(**kw):
    return ResNetV2((1, 1, 1, 1), base_width=32, num_classes=5, **kw)


def _randomize_b(model):
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(0, 0.05)


@pytest.mark.parametrize("norm", ["gn", "bn"])
@pytest.mark.parametrize("train", [True, False])
def test_zero_init_leaves_outputs_unchanged(norm, train):
    base = _model(norm=norm)
    wrapped = lora(copy.deepcopy(base), rank=4)
    base.train(train)
    wrapped.train(train)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(base(x), wrapped(x))
    names = [n for n, _ in lora_layers(wrapped)]
    assert len(names) == 16 and "stem.conv" not in names  # 4 units x (3 convs + projection); stem left


def test_forward_and_gradients_match_explicit_update():
    conv = StdConv2d(6, 8, 3, padding=1, eps=1e-8).double()
    layer = LoRAStdConv2d.from_conv(conv, rank=3, alpha=6.0)
    assert layer.weight is conv.weight and layer.scaling == 2.0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    out = layer(x)
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    w = conv.weight.detach() + (2.0 * a @ b.t()).reshape(conv.weight.shape)
    want = F.conv2d(x, reference.weight_standardize(w, 1e-8), None, 1, 1)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)


def test_merge_unmerge_round_trip():
    model = lora(_model(), rank=4).eval()
    _randomize_b(model)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    merge(model)
    assert all(m.merged for _, m in lora_layers(model))
    changed = [n for n, _ in lora_layers(model) if not torch.equal(model.get_submodule(n).weight, before[n + ".weight"])]
    assert len(changed) == 16
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    unmerge(model)
    for n, v in model.state_dict().items():
        torch.testing.assert_close(v, before[n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


def test_only_lora_factors_and_head_get_gradients():
    model = lora(_model(), rank=2)
    _randomize_b(model)
    F.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 3])).backward()
    for n, p in model.named_parameters():
        if n.endswith("lora_A") or n.endswith("lora_B") or n.startswith("head."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n

    frozen_head = lora(_model(), rank=2, trainable=())
    assert {n for n, p in frozen_head.named_parameters() if p.requires_grad} == {
        n for n, _ in frozen_head.named_parameters() if n.endswith(("lora_A", "lora_B"))
    }


def test_sgd_steps_reduce_the_loss():
    torch.manual_seed(1)
    model = lora(_model(), rank=4, trainable=())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(lora_parameters(model), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 1e-3, losses


def test_state_dicts():
    base = _model()
    model = lora(copy.deepcopy(base), rank=3)
    base_keys = set(base.state_dict())
    keys = set(model.state_dict())
    extra = keys - base_keys
    assert base_keys <= keys
    assert extra == {f"{n}.lora_{ab}" for n, _ in lora_layers(model) for ab in "AB"}
    # A base checkpoint loads, only the LoRA factors are missing.
    res = model.load_state_dict(base.state_dict(), strict=False)
    assert set(res.missing_keys) == extra and not res.unexpected_keys

    _randomize_b(model)
    sd = lora_state_dict(model)
    assert set(sd) == extra
    assert set(lora_state_dict(model, include_trainable=True)) == extra | {"head.fc.weight", "head.fc.bias"}
    other = lora(copy.deepcopy(base), rank=3)
    load_lora_state_dict(other, {k: v.clone() for k, v in sd.items()})
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="different rank"):
        load_lora_state_dict(lora(copy.deepcopy(base), rank=2), sd)
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(other, {})


def test_unwrap_gives_plain_stdconv_with_base_keys():
    base = _model()
    model = lora(copy.deepcopy(base), rank=4).eval()
    _randomize_b(model)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    unwrap(model)
    assert not list(lora_layers(model))
    assert all(type(m) is StdConv2d for n, m in model.named_modules() if isinstance(m, StdConv2d))
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


def test_targets_patterns_and_predicate():
    model = lora(_model(), rank=2, targets=["stages.3.*"])
    assert [n for n, _ in lora_layers(model)] == [
        "stages.3.blocks.0.downsample.conv", "stages.3.blocks.0.conv1", "stages.3.blocks.0.conv2",
        "stages.3.blocks.0.conv3",
    ]
    model = lora(_model(), rank=2, targets=lambda name, m: m.kernel_size == (3, 3))
    assert len(list(lora_layers(model))) == 4
    model = lora(_model(), rank=2, targets=["stem.conv"])
    assert [n for n, _ in lora_layers(model)] == ["stem.conv"]


def test_rank_dropout_only_in_training():
    model = lora(_model(), rank=4, dropout=0.5)
    _randomize_b(model)
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    ev = model(x)
    torch.testing.assert_close(model(x), ev)
    model.train()
    torch.manual_seed(3)
    tr1 = model(x)
    torch.manual_seed(4)
    tr2 = model(x)
    assert not torch.allclose(tr1, tr2)


def test_report():
    model = lora(_model(), rank=4)
    rep = lora_report(model, states_per_param=2)
    params = dict(model.named_parameters())
    n_lora = sum(p.numel() for n, p in params.items() if n.endswith(("lora_A", "lora_B")))
    n_base = sum(p.numel() for n, p in params.items() if not n.endswith(("lora_A", "lora_B")))
    n_head = params["head.fc.weight"].numel() + params["head.fc.bias"].numel()
    assert rep.layers == 16 and rep.lora_params == n_lora
    assert rep.trainable_params == n_lora + n_head
    assert rep.total_params == n_lora + n_base
    assert rep.optimizer_bytes_full == 2 * 4 * n_base
    assert rep.optimizer_bytes_lora == 2 * 4 * (n_lora + n_head)
    assert rep.optimizer_bytes_saved == rep.optimizer_bytes_full - rep.optimizer_bytes_lora > 0
    assert "16 convs wrapped" in str(rep) and "saves" in str(rep)


def test_errors():
    with pytest.raises(ValueError, match=r"rank 64 is larger than this conv allows.*min\(128, 32\) = 32"):
        lora(_model(), rank=64)
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        lora(_model(), rank=0)
    with pytest.raises(ValueError, match="alpha"):
        lora(_model(), rank=2, alpha=0.0)
    with pytest.raises(ValueError, match="dropout"):
        lora(_model(), rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="selects no bitfast StdConv2d.*head.fc \\(Conv2d\\)"):
        lora(_model(), rank=2, targets=["head.*"])
    with pytest.raises(ValueError, match="found no bitfast StdConv2d"):
        lora(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), rank=1)
    model = lora(_model(), rank=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora(model, rank=2)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge(model)
    merge(model)
    with pytest.raises(RuntimeError, match="already merged"):
        merge(model)
    with pytest.raises(RuntimeError, match="already merged"):
        next(lora_layers(model))[1].merge()
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge(_model())
    with pytest.raises(TypeError, match="expected a bitfast StdConv2d"):
        LoRAStdConv2d.from_conv(torch.nn.Conv2d(3, 4, 3), rank=1)


def test_compiles_without_graph_breaks():
    model = lora(torch.nn.Sequential(StdConv2d(4, 8, 3), GroupNormReLU(8, 4), StdConv2d(8, 6, 1)), rank=2,
                 trainable=())
    _randomize_b(model)
    x = torch.randn(2, 4, 7, 7)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).square().sum().backward()
    assert set(got) == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
