"""End to end: a BiT-R50x1 with bitfast's default (fastest available) backends against the
reference backend and a float64 evaluation, in float32 and bfloat16 autocast with
channels_last, on the CPU and (when present) a CUDA GPU.

At random initialisation a pre-activation ResNet's gradients are poorly conditioned: in
bfloat16 both backends land far from float64 (seen: about 0.97 relative on the CPU). So,
as for the ops, bitfast must be within twice the reference backend's own error (plus a
floor), never compared elementwise with it.
"""

import pytest
import torch

import bitfast
from bitfast.optim import FusedSGD
from tests.conftest import devices


def _loss_and_grads(model, x, y, amp_dtype):
    device = x.device.type
    with torch.autocast(device, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach().double(), grads


def _rel(a: dict, b: dict) -> float:
    num = sum((a[n] - b[n]).norm() ** 2 for n in b) ** 0.5
    den = sum(b[n].norm() ** 2 for n in b) ** 0.5
    return float(num / den)


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_model_gradients_match_reference_within_its_own_error(device, norm):
    torch.manual_seed(0)
    fast = bitfast.create_model("resnetv2_50x1_bit", num_classes=10, norm=norm)
    ref = bitfast.create_model("resnetv2_50x1_bit", num_classes=10, norm=norm, backend="reference")
    exact = bitfast.create_model("resnetv2_50x1_bit", num_classes=10, norm=norm, backend="reference")
    ref.load_state_dict(fast.state_dict())
    exact.load_state_dict(fast.state_dict())
    cl = torch.channels_last
    fast, ref = fast.to(device, memory_format=cl), ref.to(device, memory_format=cl)
    exact = exact.to(device, torch.float64)
    size = 128 if device == "cuda" else 64
    x = torch.randn(4, 3, size, size, device=device)
    y = torch.randint(0, 10, (4,), device=device)
    loss64, g64 = _loss_and_grads(exact, x.double(), y, None)
    amp = [None, torch.bfloat16]
    for amp_dtype in amp:
        xin = x.contiguous(memory_format=cl)
        loss_f, g_f = _loss_and_grads(fast, xin, y, amp_dtype)
        loss_r, g_r = _loss_and_grads(ref, xin, y, amp_dtype)
        err_f, err_r = _rel(g_f, g64), _rel(g_r, g64)
        floor = 1e-4 if amp_dtype is None else 5e-2
        assert err_f <= 2 * err_r + floor, f"{amp_dtype}: gradient error {err_f:.3e} vs reference {err_r:.3e}"
        lerr_f, lerr_r = abs(loss_f - loss64) / loss64, abs(loss_r - loss64) / loss64
        assert lerr_f <= 2 * lerr_r + floor / 10, f"{amp_dtype}: loss error {lerr_f:.3e} vs reference {lerr_r:.3e}"


@pytest.mark.parametrize("device", devices())
def test_fused_sgd_trains_a_channels_last_model_like_torch_sgd(device):
    torch.manual_seed(0)
    model = bitfast.create_model("resnetv2_50x1_bit", num_classes=10).to(device, memory_format=torch.channels_last)
    twin = bitfast.create_model("resnetv2_50x1_bit", num_classes=10).to(device, memory_format=torch.channels_last)
    twin.load_state_dict(model.state_dict())
    fused = FusedSGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    plain = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    for _ in range(3):
        # The same gradients for both: the optimizers are what is compared here.
        for p, q in zip(model.parameters(), twin.parameters()):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        fused.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert p.stride() == q.stride(), f"{name}: the step changed the parameter's layout"
