"""The benchmark of a BiT-R50x1 training step (forward, backward, optimizer): bitfast's model with
``FusedSGD``, eager, under ``torch.compile`` (``bitfast-compile``) and with the whole step in a
CUDA graph (``bitfast-cudagraphs``, ``bitfast.train.graphs.CUDAGraphStep``; GPUs only), against a timm-style eager
model with ``torch.optim.SGD``, its ``torch.compile`` in the default mode, in
``max-autotune-no-cudagraphs`` and in ``reduce-overhead`` (CUDA graphs; the last two on GPUs
only), and timm's own model when timm is installed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bitfast.bench import harness as h
from bitfast.bench.baselines import EagerGroupNormAct, EagerStdConv2d

# (model, batch, image size)
SIZES = {
    ("cuda", False): ("resnetv2_50x1_bit", 128, 224),
    ("cuda", True): ("resnetv2_50x1_bit", 128, 224),
    ("cpu", False): ("resnetv2_50x1_bit", 16, 128),
    ("cpu", True): ("resnetv2_50x1_bit", 8, 64),
}


# bitfast's variants.
OWN = ("bitfast", "bitfast-compile", "bitfast-cudagraphs")

# The compiled baselines: implementation -> torch.compile mode.
COMPILE_MODES = {"compile": None, "compile-max-autotune": "max-autotune-no-cudagraphs",
                 "compile-reduce-overhead": "reduce-overhead"}


def _shapes(device: str, quick: bool) -> dict:
    model, batch, size = SIZES[(device, quick)]
    return {f"R50x1 {size}px b{batch}": (model, batch, size)}


def train_model(impl: str, model_name: str, device: str, channels_last: bool):
    """The model and optimizer of a train-step variant."""
    import bitfast

    if impl in OWN:
        model = bitfast.create_model(model_name)
    elif impl in ("eager", *COMPILE_MODES):
        model = bitfast.create_model(model_name, conv_layer=EagerStdConv2d, norm_layer=EagerGroupNormAct)
    elif impl == "timm":
        import timm

        model = timm.create_model(model_name, num_classes=1000)
    else:
        raise ValueError(f"train_step: unknown implementation {impl!r}; expected one of {h.implementations('train_step')}")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if impl.startswith("bitfast"):
        opt = bitfast.optim.FusedSGD(model.parameters(), lr=h.LR, momentum=h.MOMENTUM, weight_decay=h.WEIGHT_DECAY)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=h.LR, momentum=h.MOMENTUM, weight_decay=h.WEIGHT_DECAY)
    if impl == "bitfast-compile":
        model = torch.compile(model, dynamic=False)
    elif impl in COMPILE_MODES:
        model = torch.compile(model, dynamic=False, mode=COMPILE_MODES[impl])
    return model, opt


def _graphed_step(model, opt, dtype, batch, device, xs, ys, rot):
    """The step of ``bitfast-cudagraphs``: forward (cross-entropy, the training loop's task),
    backward, the finite-step check and FusedSGD, captured by ``CUDAGraphStep`` after its
    eager warm-up steps, which run here, before any timing; a call copies the batch into the
    graph's buffers and replays it. Returns the mean loss as a device tensor. It is the step
    of ``--cuda-graphs``, so it includes the finite-step check the training loop makes (three
    multi-tensor max-norms over weights, gradients and momentum) that the other variants
    leave out."""
    from bitfast.train.distributed import DistInfo
    from bitfast.train.graphs import CUDAGraphStep
    from bitfast.train.step import TrainState
    from bitfast.train.task import Classification

    state = TrainState(base=model, net=model, opt=opt, scaler=torch.amp.GradScaler("cuda", enabled=False),
                       task=Classification(1000), info=DistInfo(device=torch.device(device)), local_batch=batch,
                       autocast_dtype=None if dtype == torch.float32 else dtype)
    step = CUDAGraphStep(state)

    def fn():
        i = rot.next()
        return step(xs[i], ys[i])[0] / batch

    for _ in range(step.warmup_steps + 1):  # the eager warm-up, then the capture
        fn()
    return fn


def _case(spec: h.Spec, device: str, value, quick: bool) -> h.Case:
    model_name, batch, size = value
    dtype = h.DTYPES[spec.dtype]
    torch.manual_seed(0)
    model, opt = train_model(spec.impl, model_name, device, spec.layout == "channels_last")
    fmt = h.LAYOUTS[spec.layout]
    xs = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt) for _ in range(2)]
    ys = [torch.randint(0, 1000, (batch,), device=device) for _ in range(2)]
    rot = h.Rotor(2)
    if spec.impl == "bitfast-cudagraphs":
        fn = _graphed_step(model, opt, dtype, batch, device, xs, ys, rot)
    else:
        def fn():
            i = rot.next()
            with h.autocast(device, dtype):
                loss = F.cross_entropy(model(xs[i]), ys[i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    def check():
        loss = fn().item()
        # A freshly initialised 1000-class model starts near ln(1000) = 6.9.
        assert math.isfinite(loss) and 0 < loss < 50, f"train_step [{spec.impl}]: loss {loss}"

    return h.Case(spec, device, fn, check, items=batch, shape_value=list(value))


h.register(h.BenchOp(
    "train_step", modes=("step",), baselines=("eager", *COMPILE_MODES, "timm"), own=OWN,
    shapes=_shapes, dtypes=lambda device, quick: ["bf16"] if device == "cuda" else ["fp32"],
    layouts=lambda device, quick: ["channels_last"], factory=_case,
    title="`train_step` (BiT-R50x1: forward, backward, optimizer)",
    own_notes="`bitfast` (auto backends + `FusedSGD`), `bitfast-compile` (its model under `torch.compile`), "
              "`bitfast-cudagraphs` (the whole step in a CUDA graph, `bitfast.train.graphs`)",
    baseline_notes="`eager` (timm-style layers + `torch.optim.SGD`), `compile` (default mode), "
                   "`compile-max-autotune` (`max-autotune-no-cudagraphs`), `compile-reduce-overhead` (CUDA graphs), "
                   "`timm` (when installed)", order=90,
))
