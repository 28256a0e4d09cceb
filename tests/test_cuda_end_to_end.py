"""End-to-end checks on a CUDA GPU (skipped without one): a BiT model trained one step
with bitfast's default (fastest available) backends matches the reference backend,
in bfloat16 autocast with channels_last, eagerly and under torch.compile."""

import pytest
import torch

import bitfast
from bitfast.optim import FusedSGD

pytestmark = pytest.mark.cuda


def _step(model, x, y, opt):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_train_step_matches_reference_bf16_channels_last(norm):
    torch.manual_seed(0)
    fast = bitfast.create_model("resnetv2_50x1_bit", num_classes=10, norm=norm).cuda()
    ref = bitfast.create_model("resnetv2_50x1_bit", num_classes=10, norm=norm, backend="reference").cuda()
    ref.load_state_dict(fast.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    ref = ref.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 128, 128, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device="cuda")
    opt_fast = FusedSGD(fast.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        loss_f, g_f = _step(fast, x, y, opt_fast)
        loss_r, g_r = _step(ref, x, y, opt_ref)
        assert torch.isfinite(loss_f)
        torch.testing.assert_close(loss_f, loss_r, rtol=2e-2, atol=2e-2)
        num = sum((g_f[n].float() - g_r[n].float()).norm() ** 2 for n in g_r) ** 0.5
        den = sum(g_r[n].float().norm() ** 2 for n in g_r) ** 0.5
        assert num / den < 5e-2, f"relative gradient difference {num / den:.3e}"
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-2, atol=1e-3, msg=name)


def test_compile_fullgraph_on_cuda_matches_eager():
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = bitfast.create_model("resnetv2_50x1_bit", num_classes=10).cuda().to(memory_format=torch.channels_last)
    twin = bitfast.create_model("resnetv2_50x1_bit", num_classes=10).cuda().to(memory_format=torch.channels_last)
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_e = model(x)
        out_c = compiled(x)
    torch.testing.assert_close(out_c.float(), out_e.float(), rtol=3e-2, atol=3e-2)
    out_e.float().square().mean().backward()
    out_c.float().square().mean().backward()
    num = sum((p.grad - q.grad).norm() ** 2 for p, q in zip(model.parameters(), twin.parameters())) ** 0.5
    den = sum(p.grad.norm() ** 2 for p in model.parameters()) ** 0.5
    assert num / den < 5e-2


def test_backends_on_cuda():
    avail = bitfast.available_backends()
    assert "triton" in avail
    # weight standardization has native CUDA and Triton kernels: auto picks a fast one.
    assert bitfast.backends.resolve("weight_standardize", "cuda", torch.float32) in ("cuda", "triton")
