"""ModelEMA against a hand-computed average: parameters and floating buffers averaged (or
buffers copied), integer buffers copied, half-precision tensors averaged in float32;
copy_to, swap (restoring on exceptions), state_dict round trips and bad input; and the
average FusedSGD(ema_decay=...) keeps in its fused pass equal to ModelEMA's."""

from __future__ import annotations

import io

import pytest
import torch

from bitfast.optim import ModelEMA


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).to(dtype)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    model.train()
    model(torch.randn(8, 5, dtype=next(model.parameters()).dtype)).square().sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("buffers", ["average", "copy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_matches_hand_computation(dtype, buffers):
    model = _model(dtype)
    decay = 0.75
    ema = ModelEMA(model, decay=decay, buffers=buffers)
    hand = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True)
            for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = {name for name, _ in model.named_parameters()}
    for _ in range(5):
        _train_step(model, opt)
        ema.update(model)
        for name, value in model.state_dict().items():
            if value.is_floating_point() and (name in params or buffers == "average"):
                v = value.double()
                hand[name] = (decay * hand[name].double() + (1 - decay) * v).float()
            else:
                hand[name] = value.to(hand[name].dtype, copy=True)
    assert ema.num_updates == 5
    shadow = ema.shadow
    assert shadow.keys() == hand.keys()
    for name, expected in hand.items():
        got = shadow[name]
        assert got.dtype == expected.dtype, name
        if got.is_floating_point():
            assert got.dtype == torch.float32  # float32 averages for bf16 tensors
            torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6, msg=name)
        else:
            assert torch.equal(got, expected), name
    # the running mean moved each step: averaged it differs from the model's, copied it equals it
    rm = model[1].running_mean.float()
    assert torch.equal(shadow["1.running_mean"], rm) == (buffers == "copy")
    assert torch.equal(shadow["1.num_batches_tracked"], model[1].num_batches_tracked)


def test_copy_to_and_swap():
    model = _model()
    ema = ModelEMA(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        _train_step(model, opt)
        ema.update(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swap(model) as m:
        assert m is model
        for name, v in model.state_dict().items():
            assert torch.equal(v, ema.shadow[name].to(v.dtype)), name
        assert not torch.equal(model[0].weight, trained["0.weight"])
    for name, v in model.state_dict().items():
        assert torch.equal(v, trained[name]), name
    with pytest.raises(KeyError):
        with ema.swap(model):
            raise KeyError("evaluation failed")
    for name, v in model.state_dict().items():
        assert torch.equal(v, trained[name]), name
    other = _model()
    ema.copy_to(other)
    for name, v in other.state_dict().items():
        assert torch.equal(v, ema.shadow[name]), name


def test_state_dict_round_trip():
    model = _model()
    ema = ModelEMA(model, decay=0.9, buffers="copy")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        _train_step(model, opt)
        ema.update(model)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    restored = ModelEMA(_model(), decay=0.1)
    restored.load_state_dict(sd)
    assert restored.decay == 0.9 and restored.buffers == "copy" and restored.num_updates == 2
    for name, v in ema.shadow.items():
        assert torch.equal(restored.shadow[name], v), name
    # both continue identically
    _train_step(model, opt)
    ema.update(model)
    restored.update(model)
    for name, v in ema.shadow.items():
        assert torch.equal(restored.shadow[name], v), name


def test_bad_input():
    model = _model()
    for decay in (1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"ModelEMA: decay must be in \[0, 1\)"):
            ModelEMA(model, decay=decay)
    with pytest.raises(TypeError, match="decay must be a float"):
        ModelEMA(model, decay="0.9")
    with pytest.raises(ValueError, match="buffers must be one of"):
        ModelEMA(model, buffers="skip")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ModelEMA([torch.zeros(2)])
    ema = ModelEMA(model)
    with pytest.raises(ValueError, match="differ from the averaged ones"):
        ema.update(torch.nn.Linear(5, 4))
    wrong = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"0.weight has shape \(3, 5\)"):
        ema.copy_to(wrong)
    with pytest.raises(ValueError, match="names differ"):
        ema.load_state_dict({"shadow": {"x": torch.zeros(1)}})
    with pytest.raises(ValueError, match="expected a dict from ModelEMA.state_dict"):
        ema.load_state_dict({})


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_average_equals_model_ema(backend, dtype):
    """FusedSGD(ema_decay=d) keeps, in its own pass, the same average as ModelEMA(decay=d)
    updated after each step of a plain FusedSGD on a twin model."""
    from bitfast import backends
    from bitfast.optim import FusedSGD

    reasons = backends.not_supported_reasons(backend, "sgd_momentum", "cpu", dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    torch.manual_seed(0)
    fused_model = _model(dtype)
    twin = _model(dtype)
    twin.load_state_dict(fused_model.state_dict())
    decay = 0.8
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, backend=backend)
    fused = FusedSGD(fused_model.parameters(), ema_decay=decay, **kw)
    plain = FusedSGD(twin.parameters(), **kw)
    ema = ModelEMA(twin, decay=decay, buffers="copy")
    for step in range(6):
        torch.manual_seed(step)
        _train_step(fused_model, fused)
        torch.manual_seed(step)
        _train_step(twin, plain)
        ema.update(twin)
    for p, q in zip(fused_model.parameters(), twin.parameters()):
        assert torch.equal(p, q)  # the same steps: the averages see the same parameters
    names = [name for name, _ in twin.named_parameters()]
    for name, avg in zip(names, fused.ema_parameters()):
        expected = ema.shadow[name]
        assert avg.dtype == expected.dtype == torch.float32, name
        torch.testing.assert_close(avg, expected, rtol=1e-6, atol=1e-7, msg=name)
