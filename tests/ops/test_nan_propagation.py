"""Non-finite values propagate through every norm + ReLU kernel exactly as through the
reference (PyTorch's ``relu`` keeps NaN): a NaN in the input must not come out as 0, or a
diverged training run would continue silently on zeros instead of stopping."""

import pytest
import torch

import bitfast

from ._util import REFERENCE_OP, batch_norm_relu, device_backends, group_norm_relu, require_backend

# NaN and Inf in the interpreter's numpy arithmetic warn; the values are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _poisoned(device, dtype, channels_last, value):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 3, device=device, dtype=dtype)
    x[0, 1, 2, 1] = value  # one group (GN) / one channel (BN) of sample 0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _assert_same_nonfinite(out, ref, what):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{what}: NaN positions differ from the reference"
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), f"{what}: Inf positions differ from the reference"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite].float(), ref[finite].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_group_norm_relu_propagates_nonfinite(device, backend, value, channels_last, dtype):
    if backend != REFERENCE_OP:
        require_backend(backend, "group_norm_relu", device, dtype)
    x = _poisoned(device, dtype, channels_last, value)
    w = torch.randn(8, device=device)
    b = torch.randn(8, device=device)
    ref = bitfast.ops.group_norm_relu(x, 4, w, b, backend="reference")
    out = group_norm_relu(backend)(x, 4, w, b)
    assert torch.isnan(ref).any()  # the poisoned group's statistics are NaN
    _assert_same_nonfinite(out, ref, f"group_norm_relu[{backend}]")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_relu_add_propagates_nan(device, backend, channels_last):
    require_backend(backend, "group_norm_relu_add", device, torch.float32)
    a = _poisoned(device, torch.float32, channels_last, float("nan"))
    b = torch.randn_like(a)
    s_ref, y_ref = bitfast.ops.group_norm_relu_add(a, b, 4, backend="reference")
    if backend == REFERENCE_OP:
        s, y, _, _ = torch.ops.bitfast.group_norm_relu_add_fwd(a, b, None, None, 4, 1e-5, True, "reference")
    else:
        s, y = bitfast.ops.group_norm_relu_add(a, b, 4, backend=backend)
    _assert_same_nonfinite(s, s_ref, f"group_norm_relu_add[{backend}] sum")
    _assert_same_nonfinite(y, y_ref, f"group_norm_relu_add[{backend}] y")


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_relu_propagates_nan(device, backend, training, channels_last):
    if backend != REFERENCE_OP:
        require_backend(backend, "batch_norm_relu", device, torch.float32)
    x = _poisoned(device, torch.float32, channels_last, float("nan"))
    w = torch.randn(8, device=device)
    b = torch.randn(8, device=device)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    ref = bitfast.ops.batch_norm_relu(x, rm, rv, w, b, training, backend="reference")
    out = batch_norm_relu(backend)(x, rm2, rv2, w, b, training)
    assert torch.isnan(ref).any()
    _assert_same_nonfinite(out, ref, f"batch_norm_relu[{backend}]")
    if training:
        assert torch.equal(torch.isnan(rm2), torch.isnan(rm)) and torch.equal(torch.isnan(rv2), torch.isnan(rv))
