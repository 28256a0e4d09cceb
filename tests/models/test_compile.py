"""torch.compile(fullgraph=True) of a full BiT-R50x1: one graph, no graph breaks, forward
and backward matching eager.

Compiler choice, measured on the 2-core CI machine (cold caches): inductor takes about
140 s for R50x1 forward + backward (and still 90-120 s for a one-unit-per-stage model),
almost all of it generating and compiling C++ kernels. The unmarked tests therefore compile
the full R50x1 with ``aot_eager`` (about 10-25 s each): it runs everything that decides
whether the model compiles, namely Dynamo with ``fullgraph=True`` (no graph break allowed)
and AOTAutograd tracing the joint forward/backward graph through the ops' fake impls and
registered autograd formulas, but no code generation. The inductor runs of the same
model are marked ``slow``.
"""

import time

import pytest
import torch
import torch.nn.functional as F

import bitfast
from bitfast.models import create_model

PARAMS = ["stem.conv.weight", "stages.0.blocks.0.downsample.conv.weight", "stages.3.blocks.2.norm3.weight",
          "norm.bias", "head.fc.weight"]


def _run(backend_name: str, backend: str | None):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("resnetv2_50x1_bit", num_classes=10, backend=backend)
    with torch.no_grad():  # a non-trivial head so that every gradient is non-zero
        model.head.fc.weight.normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    target = torch.tensor([1, 7])

    graphs = []
    inner = torch._dynamo.lookup_backend(backend_name)

    def counting(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=counting, fullgraph=True)
    start = time.perf_counter()
    loss_c = F.cross_entropy(compiled(x), target)
    loss_c.backward()
    elapsed = time.perf_counter() - start
    grads_c = {k: p.grad.clone() for k, p in model.named_parameters() if k in PARAMS}
    model.zero_grad()

    loss_e = F.cross_entropy(model(x), target)
    loss_e.backward()
    grads_e = {k: p.grad.clone() for k, p in model.named_parameters() if k in PARAMS}
    return graphs, loss_c.detach(), loss_e.detach(), grads_c, grads_e, elapsed


def _check(backend_name, backend, rtol, atol):
    graphs, loss_c, loss_e, grads_c, grads_e, elapsed = _run(backend_name, backend)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    if backend is None and "cpp" in bitfast.available_backends():
        # The fused ops are in the graph, not traced around.
        assert "bitfast" in str(graphs[0].graph)
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
    assert len(grads_c) == len(PARAMS)
    for k in PARAMS:
        assert grads_e[k].abs().sum() > 0, k
        torch.testing.assert_close(grads_c[k], grads_e[k], rtol=rtol, atol=atol, msg=k)
    print(f"compile {backend_name} backend={backend}: {elapsed:.1f}s (compile + first step)")


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
def test_compile_fullgraph_r50x1_aot_eager(backend):
    _check("aot_eager", backend, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
def test_compile_fullgraph_r50x1_inductor(backend):
    _check("inductor", backend, rtol=1e-3, atol=1e-4)
