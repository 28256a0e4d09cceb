"""ResNetV2's grouped weight standardization (``ws_grouping``): every conv weight standardized
by one ``weight_standardize_multi`` call per group instead of one op per conv.

The same numbers as per-conv standardization (bit for bit on the C++ backend, forward and
every gradient; within the parity rule on Triton), two standardization ops per training
forward+backward of BiT-R50x1 instead of 106, and the convs that must keep their own
standardization (hooks, LoRA, a backend without a list kernel) keeping it.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bitfast
from bitfast import backends
from bitfast.adapt import LoRAStdConv2d, lora
from bitfast.models import ResNetV2
from tests.ops._util import assert_parity

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kwargs) -> ResNetV2:
    torch.manual_seed(0)
    return ResNetV2((1, 1, 1, 1), base_width=32, num_classes=5, **kwargs)


def _step(model, x, grouping):
    model.ws_grouping = grouping
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _require(backend: str, dtype: torch.dtype) -> None:
    for family in ("weight_standardize", "weight_standardize_multi"):
        reasons = backends.not_supported_reasons(backend, family, "cpu", dtype)
        if reasons:
            pytest.skip("; ".join(reasons))


class _CountStandardizations(TorchDispatchMode):
    """Counts the weight-standardization ops dispatched (bitfast's public ops; a dispatch mode
    sends the eager fast path through the registered ops, so every call is seen)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "weight_standardize" in name:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grouping", ["model", "stage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grouped_equals_per_conv_bit_for_bit_on_cpp(grouping, dtype, layout):
    _require("cpp", dtype)
    model = _tiny(backend="cpp").to(dtype)
    x = torch.randn(2, 3, 32, 32).to(dtype)
    if layout == "channels_last":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out, grads = _step(model, x, grouping)
    assert model.ws_groups() is not None
    ref_out, ref_grads = _step(model, x, "conv")
    assert torch.equal(out, ref_out)
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
        assert g.stride() == ref_grads[name].stride(), name


@pytest.mark.interpret
def test_grouped_on_triton_within_the_parity_rule():
    _require("triton", torch.float32)
    model = _tiny(backend="triton")
    x = torch.randn(2, 3, 16, 16)
    out, grads = _step(model, x, "model")
    assert len(model.ws_groups()) == 1
    base_out, base_grads = _step(model, x, "conv")
    ref = _tiny(backend="reference").double()
    ref.load_state_dict(model.state_dict())
    ref_out, ref_grads = _step(ref, x.double(), "conv")
    assert_parity(out, ref_out, base_out, torch.float32, "logits")
    for name, g in grads.items():
        assert_parity(g, ref_grads[name], base_grads[name], torch.float32, name)


def test_r50x1_training_step_runs_two_standardization_ops():
    """BiT-R50x1's 53 convs: one list op forward and one backward (auto grouping, one process)
    instead of 53 of each."""
    _require("cpp", torch.float32)
    torch.manual_seed(0)
    model = bitfast.create_model("resnetv2_50x1_bit", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    assert model.ws_grouping == "auto" and len(model.std_convs()) == 53
    with _CountStandardizations() as auto:
        model(x).sum().backward()
    assert auto.counts == {"bitfast.weight_standardize_multi_fwd": 1, "bitfast.weight_standardize_multi_bwd": 1}
    model.ws_grouping = "conv"
    with _CountStandardizations() as per_conv:
        model(x).sum().backward()
    assert per_conv.counts == {"bitfast.weight_standardize_fwd": 53, "bitfast.weight_standardize_bwd": 53}


def test_groups_by_stage_and_by_frozen_weights():
    _require("cpp", torch.float32)
    model = _tiny()
    model.ws_grouping = "model"
    assert model.ws_groups() == [list(range(len(model.std_convs())))]
    model.ws_grouping = "stage"
    groups = model.ws_groups()
    assert len(groups) == 4 and groups[0][0] == 0  # the stem with stage 1
    assert sorted(i for g in groups for i in g) == list(range(len(model.std_convs())))
    for p in [*model.stem.parameters(), *model.stages[0].parameters()]:
        p.requires_grad_(False)
    model.ws_grouping = "model"
    frozen, trainable = model.ws_groups()
    assert frozen == list(range(len(frozen))) and len(frozen) == 1 + 4  # stem + stage 1's four convs
    x = torch.randn(2, 3, 32, 32)
    out, grads = _step(model, x, "model")
    ref_out, ref_grads = _step(model, x, "conv")
    assert torch.equal(out, ref_out) and all(torch.equal(g, ref_grads[n]) for n, g in grads.items())


def test_convs_that_keep_their_own_standardization():
    _require("cpp", torch.float32)
    model = _tiny()
    convs = model.std_convs()
    every = set(range(len(convs)))

    def grouped():
        return {i for g in model.ws_groups() or [] for i in g}

    seen = []
    handle = model.stages[1].blocks[0].conv2.register_forward_hook(lambda m, i, o: seen.append(len(i)))
    assert grouped() == every - {convs.index(model.stages[1].blocks[0].conv2)}
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert seen == [1]  # the hook saw the call it expects: (x,)
    handle.remove()
    stem_hook = model.stem.register_forward_pre_hook(lambda m, i: None)
    assert grouped() == every - {0}
    stem_hook.remove()
    model.ws_grouping = "conv"
    assert torch.equal(out, model(x))
    model.ws_grouping = "auto"
    # LoRA-wrapped convs form W + delta in their forward: they standardize their own.
    lora(model, rank=2, targets=["stages.3.*"])
    wrapped = {i for i, c in enumerate(model.std_convs()) if isinstance(c, LoRAStdConv2d)}
    assert wrapped and grouped() == every - wrapped
    out, grads = _step(model, x, "auto")
    ref_out, ref_grads = _step(model, x, "conv")
    assert torch.equal(out, ref_out) and all(torch.equal(g, ref_grads[n]) for n, g in grads.items())


def test_no_grouping_without_a_list_kernel():
    model = _tiny(backend="reference")
    assert model.ws_groups() is None  # the reference backend standardizes per conv
    with backends.use_backend("reference"):
        assert _tiny().ws_groups() is None


def test_bad_grouping_is_refused():
    with pytest.raises(ValueError, match="ws_grouping must be one of"):
        _tiny(ws_grouping="layer")
    model = bitfast.create_model("bit_tiny", num_classes=3, ws_grouping="conv")
    assert model.ws_grouping == "conv" and model.ws_groups() is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_on_cuda_within_the_parity_rule(dtype):
    """On a GPU the list op runs on Triton (no CUDA list kernel yet) and the per-conv op on CUDA:
    the grouped model's loss gradients stay within the parity rule of the per-conv model's."""
    reasons = backends.not_supported_reasons("triton", "weight_standardize_multi", "cuda", dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    model = _tiny().cuda().to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(dtype).contiguous(memory_format=torch.channels_last)
    out, grads = _step(model, x, "auto")
    assert len(model.ws_groups()) == 1
    base_out, base_grads = _step(model, x, "conv")
    ref = _tiny(backend="reference").cuda().double()
    ref.load_state_dict(model.state_dict())
    ref_out, ref_grads = _step(ref, x.double(), "conv")
    assert_parity(out, ref_out, base_out, dtype, "logits")
    for name, g in grads.items():
        assert_parity(g, ref_grads[name], base_grads[name], dtype, name)


def test_grouped_under_cpu_autocast_equals_per_conv_bit_for_bit():
    """Under autocast the list op writes the bfloat16 weights the convs take (the per-conv path
    casts each float32 result): the same numbers, forward and backward."""
    _require("cpp", torch.float32)
    model = _tiny()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _step(model, x, "model")
        ref_out, ref_grads = _step(model, x, "conv")
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.equal(g, ref_grads[name]), name
