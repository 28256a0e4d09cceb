"""The residual add of each BiT unit fused with the next GroupNorm+ReLU: the layer helper
(``GroupNormReLU.forward_add``) and the model path that uses it (``ResNetV2`` hands each
unit's output on unsummed), against the unfused computation."""

import pytest
import torch

from bitfast.models import ResNetV2
from bitfast.models.resnetv2 import add_then_norm
from bitfast.nn import BatchNormReLU, GroupNormReLU
from bitfast.nn.layers import _fused_add_serves

LAYERS = (2, 1, 1, 1)  # 5 units: 4 adds feed a unit's norm1, the last one the final norm


def _op_counts(fn) -> dict[str, int]:
    """Calls of each bitfast op: ``bitfast::<op>`` counts the registered op or, in eager
    execution, the native op its public function calls directly (whichever ran: the
    registered op calls the native one inside)."""
    with torch.profiler.profile() as prof:
        fn()
    counts: dict[str, int] = {}
    for e in prof.key_averages():
        if e.key.startswith("bitfast::"):
            key = e.key.replace("bitfast::native_", "bitfast::")
            counts[key] = max(counts.get(key, 0), e.count)
    return counts


def _step(model, x):
    model.zero_grad()
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[1])).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "backend,channels_last",
    [(None, False), (None, True), ("reference", False)],
    ids=["auto-nchw", "auto-channels_last", "reference-nchw"],
)
def test_model_fused_path_matches_unfused(backend, channels_last):
    torch.manual_seed(0)
    model = ResNetV2(LAYERS, 1, num_classes=10, base_width=32, backend=backend)
    x = torch.randn(2, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    counts = _op_counts(lambda: _step(model, x))
    if backend is None:
        assert counts.get("bitfast::group_norm_relu_add_fwd") == 5, counts
        assert counts.get("bitfast::group_norm_relu_add_bwd") == 5, counts
    y, grads = _step(model, x)
    # Forward hooks on the units make the model call every unit as a module, unfused.
    handles = [blk.register_forward_hook(lambda *args: None) for stage in model.stages for blk in stage.blocks]
    try:
        assert "bitfast::group_norm_relu_add_fwd" not in _op_counts(lambda: model(x))
        y_ref, grads_ref = _step(model, x)
    finally:
        for h in handles:
            h.remove()
    # The sum is the same rounding of a + b and feeds the same kernel: identical outputs.
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_block_hooks_still_run():
    model = ResNetV2((1, 1, 1, 1), 1, num_classes=0, base_width=32)
    seen = []
    model.stages[1].blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.randn(1, 3, 64, 64))
    assert seen == [torch.Size([1, 256, 8, 8])]


def test_bn_model_does_not_fuse():
    model = ResNetV2((1, 1, 1, 1), 1, num_classes=10, base_width=32, norm="bn")
    counts = _op_counts(lambda: model(torch.randn(2, 3, 64, 64)))
    assert "bitfast::group_norm_relu_add_fwd" not in counts


@pytest.mark.parametrize("backend", [None, "reference", "triton"])
def test_group_norm_relu_forward_add(backend):
    torch.manual_seed(0)
    norm = GroupNormReLU(16, 4, backend=backend)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    a = torch.randn(2, 16, 5, 7, requires_grad=True)
    b = torch.randn(2, 16, 5, 7, requires_grad=True)
    s, y = norm.forward_add(a, b)
    s_ref = a + b
    y_ref = norm(s_ref)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    got = torch.autograd.grad((s.sum() + (y * g).sum()), (a, b, norm.weight, norm.bias))
    want = torch.autograd.grad((s_ref.sum() + (y_ref * g).sum()), (a, b, norm.weight, norm.bias))
    for x, r in zip(got, want):
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-5)


def test_add_then_norm_falls_back():
    """Norms without forward_add, mismatched operands and hooked norms run unfused."""
    a, b = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 4, 4)
    bn = BatchNormReLU(64)
    s, y = add_then_norm(bn, a, b)
    torch.testing.assert_close(y, bn(a + b), rtol=0, atol=0)
    gn = GroupNormReLU(64, 32)
    s, y = add_then_norm(gn, a, b.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, gn(a + b), rtol=1e-6, atol=1e-6)
    seen = []
    gn.register_forward_hook(lambda *args: seen.append(1))
    add_then_norm(gn, a, b)
    assert seen == [1]


def test_fused_add_serves_only_backends_with_the_kernels():
    assert _fused_add_serves("cpu", torch.float32, None)
    assert _fused_add_serves("cpu", torch.float32, "reference")
    assert not _fused_add_serves("cpu", torch.float32, "cuda")  # no fused CUDA kernel, and a CPU tensor
    assert not _fused_add_serves("cpu", torch.float64, "triton")  # Triton kernels take fp16/bf16/fp32
