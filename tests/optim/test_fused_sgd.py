"""FusedSGD against torch.optim.SGD: the two are stepped side by side on identical
parameters and gradients, for every option combination, and must agree step after step.

The reference backend runs torch.optim.SGD's own sequence of tensor ops, so there the
results must be bitwise identical. A native or Triton kernel may fuse multiply-adds and
round differently, so elsewhere the check allows a few ulps of the largest magnitude (the
``ULPS`` table); low precision is also held to the DESIGN rule: its error against an fp64
run at most twice torch's own error in that dtype, plus a floor.
"""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import pytest
import torch

import bitfast
from bitfast import backends
from bitfast.optim import FusedSGD
from bitfast.optim import fused_sgd as fused_sgd_module
from tests.conftest import devices

STEPS = 25

# Allowed |fused - torch| in ulps of the largest magnitude among the optimizer's parameters
# (or momentum buffers); one table. Observed with the C++ kernel over STEPS steps: at most
# about 3 ulps in fp32, fp64 and bf16.
ULPS = {torch.float64: 16, torch.float32: 16, torch.bfloat16: 16, torch.float16: 16}
# Floor of the DESIGN rule (error <= 2 x torch's error + floor), in ulps of the largest |value|.
FLOOR_ULPS = {torch.bfloat16: 2, torch.float16: 2}


def _eps(dtype: torch.dtype) -> float:
    if dtype.is_complex:
        dtype = torch.view_as_real(torch.empty(0, dtype=dtype)).dtype
    return torch.finfo(dtype).eps


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, scale: float, exact: bool = False, what: str = ""
) -> float:
    """``actual`` equals ``expected`` within ``ULPS`` ulps of ``scale`` (or bitwise when
    ``exact``); returns the largest difference in those ulps.

    ``scale`` is the largest magnitude among all the tensors of that kind (parameters, or
    momentum buffers) of the optimizer: a parameter that crosses zero still carries the
    rounding of the larger terms that moved it there.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = _real(actual).double(), _real(expected).double()
    diff = (a - e).abs().max().item() if a.numel() else 0.0
    if exact:
        assert torch.equal(actual, expected), f"{what}: not bitwise equal, max |diff| = {diff:.3g}"
        return 0.0
    ulps = diff / (_eps(expected.dtype) * max(scale, 1e-30))
    assert ulps <= ULPS[_real(expected).dtype], f"{what}: max |diff| = {diff:.3g} = {ulps:.2f} ulps of {scale:.3g}"
    return ulps


def _is_exact(device: str | torch.device, dtype: torch.dtype, backend: str | None = None) -> bool:
    """Whether FusedSGD runs torch's own op sequence here (the reference backend)."""
    dtype = _real(torch.empty(0, dtype=dtype)).dtype
    return backends.resolve("sgd_momentum", torch.device(device).type, dtype, backend) == "reference"


def _make_params(dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    shapes = [(17, 5), (33,), (), (8, 3, 3, 3), (1,)]
    ps = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    # A channels_last conv weight: buffers must follow the parameter's layout.
    ps[3] = ps[3].contiguous(memory_format=torch.channels_last)
    return ps


def _clone_params(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone(memory_format=torch.preserve_format).requires_grad_() for p in ps]


def _has_grad(i: int, step: int) -> bool:
    """Which parameters get a gradient at ``step``: param 1 only on even steps, param 4
    first at step 5 (its first momentum step comes mid-run, beside stepped ones)."""
    if i == 1:
        return step % 2 == 0
    if i == 4:
        return step >= 5
    return True


def _set_grads(params_a, params_b, step: int) -> None:
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        if _has_grad(i, step):
            g = torch.randn_like(a)
            a.grad = g.clone()
            b.grad = g.clone()
        else:
            a.grad = None
            b.grad = None


def _max_abs(ts) -> float:
    return max((_real(t).abs().max().item() for t in ts if t.numel()), default=0.0)


def _compare(fused: FusedSGD, ref: torch.optim.Optimizer, exact: bool, what: str = "") -> float:
    """Parameters and momentum buffers of ``fused`` equal ``ref``'s; returns the worst
    difference in ulps."""
    params, bufs = [], []
    for gf, gr in zip(fused.param_groups, ref.param_groups):
        for pf, pr in zip(gf["params"], gr["params"]):
            params.append((pf.detach(), pr.detach()))
            sf, sr = fused.state.get(pf, {}), ref.state.get(pr, {})
            assert sf.keys() == sr.keys(), f"{what}: state keys {sorted(sf)} vs torch's {sorted(sr)}"
            if "momentum_buffer" in sr:
                bf, br = sf["momentum_buffer"], sr["momentum_buffer"]
                if br is None:
                    assert bf is None
                else:
                    bufs.append((bf, br))
    worst = 0.0
    for kind, pairs in (("param", params), ("momentum_buffer", bufs)):
        scale = _max_abs(e for _, e in pairs)
        for a, e in pairs:
            worst = max(worst, assert_matches(a, e, scale, exact, f"{what} {kind}"))
    return worst


def _run_side_by_side(fused, ref, params_f, params_r, steps, start=0, on_step=None, exact=False) -> float:
    worst = 0.0
    for step in range(start, start + steps):
        _set_grads(params_f, params_r, step)
        fused.step()
        ref.step()
        if on_step is not None:
            on_step(step)
        worst = max(worst, _compare(fused, ref, exact, f"step {step}"))
    return worst


def _option_grid():
    for momentum, dampening, weight_decay, nesterov, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (0.0, 1e-4), (False, True), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        yield pytest.param(
            dict(
                momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
            ),
            id=f"m{momentum}-d{dampening}-wd{weight_decay}-{'nest' if nesterov else 'plain'}-{'max' if maximize else 'min'}",
        )


# --------------------------------------------------------------------------------------
# Parity with torch.optim.SGD
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("options", list(_option_grid()))
def test_matches_torch_sgd_every_option(options, dtype, backend):
    ps = _make_params(dtype, "cpu")
    pf, pr = _clone_params(ps), _clone_params(ps)
    fused = FusedSGD(pf, lr=0.1, backend=backend, **options)
    ref = torch.optim.SGD(pr, lr=0.1, **options)
    _run_side_by_side(fused, ref, pf, pr, STEPS, exact=_is_exact("cpu", dtype, backend))
    assert _state_dicts_equal(fused.state_dict(), ref.state_dict())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_torch_sgd_cuda(dtype):
    ps = _make_params(dtype, "cuda")
    pf, pr = _clone_params(ps), _clone_params(ps)
    opts = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    fused, ref = FusedSGD(pf, **opts), torch.optim.SGD(pr, **opts)
    _run_side_by_side(fused, ref, pf, pr, STEPS)


def test_first_step_initialises_buffers_like_torch():
    ps = _make_params(torch.float32, "cpu")
    pf, pr = _clone_params(ps), _clone_params(ps)
    opts = dict(lr=0.5, momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True)
    fused, ref = FusedSGD(pf, **opts), torch.optim.SGD(pr, **opts)
    _set_grads(pf, pr, step=0)
    assert not fused.state
    fused.step()
    ref.step()
    _compare(fused, ref, _is_exact("cpu", torch.float32), "first step")
    for p in pf:
        if p.grad is None:
            assert p not in fused.state
            continue
        buf = fused.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride(), "the buffer must keep the parameter's memory format"


def test_several_groups_scheduler_and_lr_changes():
    """Groups with different options and dtypes, a LambdaLR then a StepLR, manual lr
    edits, and a group added mid-run."""
    f32 = _make_params(torch.float32, "cpu")
    f64 = _make_params(torch.float64, "cpu")
    extra = [torch.randn(6, 4), torch.randn(9, dtype=torch.float64)]
    pf32, pr32 = _clone_params(f32), _clone_params(f32)
    pf64, pr64 = _clone_params(f64), _clone_params(f64)
    pfx, prx = _clone_params(extra), _clone_params(extra)

    def groups(p32, p64):
        return [
            {"params": p32[:2]},  # the defaults
            {"params": p32[2:] + p64[:1], "momentum": 0.0, "lr": 0.3},  # mixed dtypes, no momentum
            {"params": p64[1:3], "nesterov": True, "weight_decay": 1e-3},
            {"params": p64[3:], "dampening": 0.2, "maximize": True, "lr": 0.01},
        ]

    opts = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
    fused = FusedSGD(groups(pf32, pf64), **opts)
    ref = torch.optim.SGD(groups(pr32, pr64), **opts)
    scheds = []
    for opt in (fused, ref):
        scheds.append(
            (
                torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1 + e)),
                torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
            )
        )
    pf, pr = pf32 + pf64, pr32 + pr64
    exact = _is_exact("cpu", torch.float32) and _is_exact("cpu", torch.float64)

    def on_step(step):
        for lam, steplr in scheds:
            lam.step()
            steplr.step()
        if step == 7:
            for opt in (fused, ref):
                opt.param_groups[2]["lr"] = 0.2
                opt.param_groups[3]["momentum"] = 0.5

    _run_side_by_side(fused, ref, pf, pr, 12, on_step=on_step, exact=exact)
    assert [g["lr"] for g in fused.param_groups] == [g["lr"] for g in ref.param_groups]

    fused.add_param_group({"params": pfx, "lr": 0.02, "nesterov": True})
    ref.add_param_group({"params": prx, "lr": 0.02, "nesterov": True})
    _run_side_by_side(fused, ref, pf + pfx, pr + prx, 12, start=12, exact=exact)


def test_one_op_call_per_device_dtype_and_first_step(monkeypatch):
    """The point of FusedSGD: one sgd_momentum_ call per (device, dtype, first step) bucket."""
    calls = []
    real = fused_sgd_module.sgd_momentum_

    def spy(params, grads, bufs, **kw):
        calls.append((params[0].dtype, len(params), kw["is_first_step"]))
        return real(params, grads, bufs, **kw)

    monkeypatch.setattr(fused_sgd_module, "sgd_momentum_", spy)
    a = [torch.randn(3, requires_grad=True) for _ in range(4)]
    b = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opt = FusedSGD(a + b, lr=0.1, momentum=0.9)
    for p in a[:2] + b:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == [(torch.float32, 2, True), (torch.float64, 2, True)]
    calls.clear()
    for p in a + b:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == [(torch.float32, 2, False), (torch.float32, 2, True), (torch.float64, 2, False)]
    calls.clear()
    opt.param_groups[0]["momentum"] = 0.0
    opt.step()
    assert calls == [(torch.float32, 4, False), (torch.float64, 2, False)]


# --------------------------------------------------------------------------------------
# Low precision and complex
# --------------------------------------------------------------------------------------


def _bf16_supported_by_torch_sgd() -> bool:
    try:
        p = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.SGD([p], lr=0.1, momentum=0.9).step()
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _bf16_supported_by_torch_sgd(), reason="torch.optim.SGD cannot step bf16 on this CPU")
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
def test_bf16_matches_torch_and_is_as_accurate(nesterov):
    base = _make_params(torch.float64, "cpu")
    pf = _clone_params([p.to(torch.bfloat16) for p in base])
    pr = _clone_params([p.to(torch.bfloat16) for p in base])
    p64 = _clone_params([p.to(torch.bfloat16).double() for p in base])
    opts = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov)
    fused, ref, exact64 = FusedSGD(pf, **opts), torch.optim.SGD(pr, **opts), torch.optim.SGD(p64, **opts)
    exact = _is_exact("cpu", torch.bfloat16)
    for step in range(STEPS):
        _set_grads(pf, pr, step)
        for a, b in zip(p64, pr):
            a.grad = None if b.grad is None else b.grad.double()
        fused.step()
        ref.step()
        exact64.step()
        _compare(fused, ref, exact, f"bf16 step {step}")
        for a, b, c in zip(pf, pr, p64):
            err_fused = (a.detach().double() - c.detach()).abs().max().item()
            err_torch = (b.detach().double() - c.detach()).abs().max().item()
            floor = FLOOR_ULPS[torch.bfloat16] * _eps(torch.bfloat16) * c.detach().abs().max().item()
            assert err_fused <= 2 * err_torch + floor, (
                f"step {step}: bf16 error {err_fused:.3g} vs torch's {err_torch:.3g}"
            )


def test_complex_params_match_torch():
    ps = [torch.randn(7, 3, dtype=torch.complex64), torch.randn(5, dtype=torch.complex64)]
    pf, pr = _clone_params(ps), _clone_params(ps)
    opts = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True, maximize=True)
    fused, ref = FusedSGD(pf, **opts), torch.optim.SGD(pr, **opts)
    for _ in range(STEPS):
        for a, b in zip(pf, pr):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
        # torch's complex kernels round differently from its real ones: a few ulps.
        _compare(fused, ref, exact=False, what="complex")


# --------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------


def _state_dicts_equal(a: dict, b: dict) -> bool:
    """Same layout: param groups equal, the same state keys, tensors of the same shape and
    dtype (their values are compared by the side-by-side runs)."""
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        if sa.keys() != sb.keys():
            return False
        for name in sa:
            va, vb = sa[name], sb[name]
            if isinstance(va, torch.Tensor):
                if not (isinstance(vb, torch.Tensor) and va.shape == vb.shape and va.dtype == vb.dtype):
                    return False
            elif va != vb:
                return False
    return True


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["no-momentum", "momentum"])
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_loads_across_and_continues_identically(direction, momentum):
    ps = _make_params(torch.float32, "cpu")
    opts = dict(lr=0.1, momentum=momentum, weight_decay=1e-4)
    p_src, p_twin = _clone_params(ps), _clone_params(ps)
    src_cls, dst_cls = (torch.optim.SGD, FusedSGD) if direction == "torch_to_fused" else (FusedSGD, torch.optim.SGD)
    src, twin = src_cls(p_src, **opts), src_cls(p_twin, **opts)
    for step in range(8):
        _set_grads(p_src, p_twin, step)
        src.step()
        twin.step()

    # The formats are the same: a state dict from either class looks like the other's.
    sd = src.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sorted(sd["param_groups"][0]) == sorted(
        torch.optim.SGD(_clone_params(ps), **opts).state_dict()["param_groups"][0]
    )
    if momentum:
        assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
        assert len(sd["state"]) == len(ps)
    else:
        assert sd["state"] == {}  # torch.optim.SGD keeps no state without momentum

    # Resume: the destination continues exactly as the source's twin would.
    p_dst = _clone_params([p.detach() for p in p_src])
    dst = dst_cls(p_dst, lr=123.0)  # hyper-parameters come from the state dict
    dst.load_state_dict(_roundtrip(sd))
    assert _state_dicts_equal(dst.state_dict(), sd)
    fused, ref = (dst, twin) if dst_cls is FusedSGD else (twin, dst)
    pf, pr = (p_dst, p_twin) if dst_cls is FusedSGD else (p_twin, p_dst)
    _run_side_by_side(fused, ref, pf, pr, 10, start=8, exact=_is_exact("cpu", torch.float32))


def test_state_dict_with_none_buffers_from_older_torch_loads():
    """torch.optim.SGD before 2.x stored momentum_buffer=None for parameters stepped without
    momentum; such a state must load, and the buffer starts afresh when momentum is on."""
    p = torch.randn(4, requires_grad=True)
    opt = FusedSGD([p], lr=0.1, momentum=0.9)
    sd = opt.state_dict()
    sd["state"] = {0: {"momentum_buffer": None}}
    opt.load_state_dict(sd)
    q = p.detach().clone().requires_grad_()
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    ref.load_state_dict(sd)
    _run_side_by_side(opt, ref, [p], [q], 3)


def test_from_optimizer_continues_like_the_original():
    ps = _make_params(torch.float32, "cpu")
    pr = _clone_params(ps)
    groups = [{"params": pr[:3]}, {"params": pr[3:], "lr": 0.02, "nesterov": True, "my_tag": "head"}]
    ref = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    twin_params = _clone_params(ps)
    twin = torch.optim.SGD(
        [{"params": twin_params[:3]}, {"params": twin_params[3:], "lr": 0.02, "nesterov": True, "my_tag": "head"}],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
    )
    twin_sched = torch.optim.lr_scheduler.StepLR(twin, step_size=2, gamma=0.5)
    for step in range(6):
        _set_grads(pr, twin_params, step)
        ref.step()
        twin.step()
        sched.step()
        twin_sched.step()

    fused = FusedSGD.from_optimizer(ref)
    assert isinstance(fused, FusedSGD)
    for gf, gr in zip(fused.param_groups, ref.param_groups):
        assert gf == gr  # same tensors, options and extra keys (my_tag, initial_lr)
        assert gf["params"] is not gr["params"]
    assert fused.defaults == ref.defaults
    for p in pr:
        if p in ref.state:
            bf, br = fused.state[p]["momentum_buffer"], ref.state[p]["momentum_buffer"]
            assert torch.equal(bf, br) and bf.data_ptr() != br.data_ptr(), "buffers are copied, not shared"
    assert _state_dicts_equal(fused.state_dict(), ref.state_dict())
    # The fused one takes over from the original; the twin shows where it would have gone.
    _run_side_by_side(fused, twin, pr, twin_params, 10, start=6, exact=_is_exact("cpu", torch.float32))
    with pytest.raises(TypeError, match="expected a torch.optim.SGD"):
        FusedSGD.from_optimizer(torch.optim.Adam(pr))


# --------------------------------------------------------------------------------------
# Construction errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-0.1),
        dict(lr=0.1, momentum=-0.5),
        dict(lr=0.1, weight_decay=-1e-4),
        dict(lr=0.1, nesterov=True),
        dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
        dict(lr=torch.tensor([0.1, 0.2])),
    ],
    ids=["neg-lr", "neg-momentum", "neg-wd", "nesterov-no-momentum", "nesterov-dampening", "tensor-lr-2-elems"],
)
def test_bad_hyper_parameters_raise_like_torch(kwargs):
    with pytest.raises(ValueError) as torch_err:
        torch.optim.SGD([torch.zeros(2, requires_grad=True)], **kwargs)
    with pytest.raises(ValueError) as fused_err:
        FusedSGD([torch.zeros(2, requires_grad=True)], **kwargs)
    # torch's words first (code matching on them keeps working), then what would be right.
    assert str(fused_err.value).startswith(str(torch_err.value)), (str(fused_err.value), str(torch_err.value))


def test_bad_group_options_raise_when_added():
    opt = FusedSGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 1, "a rejected group is not kept"
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        FusedSGD([{"params": [torch.zeros(2, requires_grad=True)], "nesterov": True}], lr=0.1)


def test_differentiable_is_rejected_foreach_and_fused_are_ignored():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        FusedSGD([p], lr=0.1, differentiable=True)
    opt = FusedSGD([p], lr=0.1, foreach=True, fused=True)
    assert opt.param_groups[0]["foreach"] is True and opt.param_groups[0]["fused"] is True
    p.grad = torch.ones(2)
    opt.step()
    assert torch.equal(p.detach(), torch.full((2,), -0.1))
    # A state dict from a differentiable torch.optim.SGD cannot be stepped silently wrong.
    sd = opt.state_dict()
    sd["param_groups"][0]["differentiable"] = True
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="differentiable=True"):
        opt.step()


def test_defaults_and_signature_match_torch():
    import inspect

    ours = inspect.signature(FusedSGD.__init__).parameters
    theirs = inspect.signature(torch.optim.SGD.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].kind == param.kind and ours[name].default == param.default, name
    p = torch.zeros(2, requires_grad=True)
    assert FusedSGD([p]).defaults == torch.optim.SGD([p]).defaults


# --------------------------------------------------------------------------------------
# Step, closure, zero_grad, unsupported gradients
# --------------------------------------------------------------------------------------


def test_closure_returns_loss_and_runs_with_grad():
    torch.manual_seed(1)
    model_f = torch.nn.Linear(6, 3)
    model_r = copy.deepcopy(model_f)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    fused = FusedSGD(model_f.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(model_r.parameters(), lr=0.1, momentum=0.9)

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        return closure

    for _ in range(5):
        with torch.no_grad():  # the closure must enable grad itself, as torch's step does
            lf = fused.step(closure_for(model_f, fused))
            lr_ = ref.step(closure_for(model_r, ref))
        torch.testing.assert_close(lf, lr_)
    _compare(fused, ref, _is_exact("cpu", torch.float32))
    assert fused.step() is None


def test_step_does_not_record_autograd_history():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    FusedSGD([p], lr=0.1, momentum=0.9).step()
    assert p.grad_fn is None and p.is_leaf


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    ps = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)]
    opt = FusedSGD(ps, lr=0.1)
    ps[0].grad = torch.ones(3)
    opt.zero_grad(set_to_none=set_to_none)
    if set_to_none:
        assert ps[0].grad is None
    else:
        assert torch.equal(ps[0].grad, torch.zeros(3))
    assert ps[1].grad is None
    before = [p.detach().clone() for p in ps]
    opt.step()  # nothing to do when no parameter has a gradient (or it is zero)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ps))


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = FusedSGD(emb.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="sparse gradient"):
        opt.step()


def test_failed_step_leaves_no_uninitialised_buffer():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = FusedSGD([p], lr=0.1, momentum=0.9, backend="cuda")  # cannot serve CPU tensors
    with pytest.raises(bitfast.BackendError):
        opt.step()
    assert "momentum_buffer" not in opt.state.get(p, {})


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        FusedSGD([torch.zeros(2, requires_grad=True)], lr=0.1, backend="fortran")


def _backend_params():
    out = [pytest.param("reference", id="reference")]
    reasons = backends.not_supported_reasons("cpp", "sgd_momentum", "cpu", torch.float32)
    out.append(
        pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "available"))
    )
    return out


@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_forced_backend_matches_torch(backend, dtype):
    ps = _make_params(dtype, "cpu")
    pf, pr = _clone_params(ps), _clone_params(ps)
    opts = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    fused = FusedSGD(pf, backend=backend, **opts)
    assert fused.backend == backend
    ref = torch.optim.SGD(pr, **opts)
    # The reference backend is torch's own op sequence: bitwise equal.
    _run_side_by_side(fused, ref, pf, pr, STEPS, exact=backend == "reference")
    opts2 = dict(lr=0.05, momentum=0.9, dampening=0.1, maximize=True)
    pf, pr = _clone_params(ps), _clone_params(ps)
    _run_side_by_side(
        FusedSGD(pf, backend=backend, **opts2),
        torch.optim.SGD(pr, **opts2),
        pf,
        pr,
        STEPS,
        exact=backend == "reference",
    )


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_backend_and_state(how):
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = FusedSGD([p], lr=0.1, momentum=0.9, backend="reference")
    opt.step()
    other = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert other.backend == "reference"
    q = other.param_groups[0]["params"][0]
    assert torch.equal(other.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    q.grad = torch.ones(3)
    other.step()


@pytest.mark.parametrize("device", devices())
def test_auto_backend_runs_on_every_device(device):
    ps = _make_params(torch.float32, device)
    pf, pr = _clone_params(ps), _clone_params(ps)
    opts = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    _run_side_by_side(
        FusedSGD(pf, **opts), torch.optim.SGD(pr, **opts), pf, pr, 5, exact=_is_exact(device, torch.float32)
    )


# --------------------------------------------------------------------------------------
# Tensor learning rate
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backend_params() + ["triton"])
def test_tensor_lr_matches_float_lr_and_follows_a_scheduler(backend):
    """A tensor lr gives bitwise the steps of the same float lr; a scheduler writing into
    the tensor drives it (the group keeps the very tensor), and it matches torch.optim.SGD
    with the same tensor lr."""
    if backend == "triton" and backends.not_supported_reasons("triton", "sgd_momentum", "cpu", torch.float32):
        pytest.skip("; ".join(backends.not_supported_reasons("triton", "sgd_momentum", "cpu", torch.float32)))
    ps = _make_params(torch.float32, "cpu")
    p_tensor, p_float, p_torch = _clone_params(ps), _clone_params(ps), _clone_params(ps)
    opts = dict(momentum=0.9, weight_decay=1e-4, nesterov=True)
    lr_t = torch.tensor(0.1)
    with_tensor = FusedSGD(p_tensor, lr=lr_t, backend=backend, **opts)
    with_float = FusedSGD(p_float, lr=0.1, backend=backend, **opts)
    ref = torch.optim.SGD(p_torch, lr=torch.tensor(0.1), **opts)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (with_tensor, with_float, ref)]
    for step in range(6):
        _set_grads(p_tensor, p_float, step)
        for a, b in zip(p_torch, p_tensor):
            a.grad = None if b.grad is None else b.grad.clone()
        for o in (with_tensor, with_float, ref):
            o.step()
        for s in scheds:
            s.step()
        assert with_tensor.param_groups[0]["lr"] is lr_t
        assert float(lr_t) == float(torch.tensor(with_float.param_groups[0]["lr"]))
        for a, b in zip(p_tensor, p_float):
            assert torch.equal(a, b), f"step {step}: tensor lr differs from float lr"
        _compare(with_tensor, ref, exact=backend == "reference", what=f"step {step} vs torch")
    assert float(lr_t) == float(torch.tensor(0.1 * 0.5**3))


def test_tensor_lr_is_never_read_on_the_host(monkeypatch):
    """With a native or Triton kernel, the step passes the lr tensor through: nothing
    converts it to a Python number (which, on a GPU, would synchronize)."""
    reasons = backends.not_supported_reasons("cpp", "sgd_momentum", "cpu", torch.float32)
    if reasons:
        pytest.skip("; ".join(reasons))
    p = torch.randn(5, requires_grad=True)
    lr_t = torch.tensor(0.25)
    opt = FusedSGD([p], lr=lr_t, momentum=0.9, backend="cpp", ema_decay=0.5)
    seen = []
    for name in ("item", "__float__", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            if self is lr_t or (self.numel() == 1 and self.data_ptr() == lr_t.data_ptr()):
                seen.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    expected = p.detach() - 0.25 * torch.ones(5)
    p.grad = torch.ones(5)
    opt.step()
    monkeypatch.undo()
    assert seen == []
    torch.testing.assert_close(p.detach(), expected)


def test_tensor_lr_of_another_dtype_or_shape():
    """A float64 0-dim or a (1,)-shaped lr tensor works (converted to float32); a tensor of
    several elements is rejected like torch.optim.SGD rejects it."""
    for lr in (torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.5])):
        p = torch.ones(3, requires_grad=True)
        p.grad = torch.ones(3)
        FusedSGD([p], lr=lr).step()
        torch.testing.assert_close(p.detach(), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        FusedSGD([torch.ones(3, requires_grad=True)], lr=torch.tensor([0.1, 0.2]))


# --------------------------------------------------------------------------------------
# Moving average of the parameters (ema_decay)
# --------------------------------------------------------------------------------------


def _ema_backends():
    out = _backend_params()
    reasons = backends.not_supported_reasons("triton", "sgd_momentum", "cpu", torch.float32)
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "ok")))
    return out


@pytest.mark.parametrize("backend", _ema_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "options",
    [dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3), dict(weight_decay=1e-3, maximize=True)],
    ids=["momentum", "nesterov-wd", "plain-wd-max"],
)
def test_ema_matches_torch_sgd_with_a_hand_written_average(options, dtype, backend):
    """Parameters as torch.optim.SGD's (params stepped on some steps only), and averages as a
    hand-written average of those, started at each parameter's value before its first
    step and moved only on its steps; float32 averages for bf16 parameters."""
    if dtype == torch.bfloat16 and not _bf16_supported_by_torch_sgd():
        pytest.skip("torch.optim.SGD cannot step bf16 on this CPU")
    decay = 0.7
    ps = _make_params(dtype, "cpu")
    pf, pr = _clone_params(ps), _clone_params(ps)
    fused = FusedSGD(pf, lr=0.05, ema_decay=decay, backend=backend, **options)
    ref = torch.optim.SGD(pr, lr=0.05, **options)
    hand: dict[int, torch.Tensor] = {}
    for step in range(12):
        _set_grads(pf, pr, step)
        for i, p in enumerate(pr):
            if p.grad is not None and i not in hand:
                hand[i] = p.detach().float().clone()
        fused.step()
        ref.step()
        for i, p in enumerate(pr):
            if p.grad is not None:
                hand[i].lerp_(p.detach().float(), 1 - decay)
    exact = backend == "reference"
    pairs = [(pf[i], pr[i]) for i in range(len(ps))]
    scale = _max_abs(p.detach() for _, p in pairs)
    for a, e in pairs:
        assert_matches(a.detach(), e.detach(), scale, exact, "param")
    emas = fused.ema_parameters()
    for i, p in enumerate(pf):
        ema = fused.state[p]["ema"]
        assert emas[i] is ema and ema.dtype == torch.float32 and ema.stride() == p.stride()
        # bf16 params: the averages follow parameters that differ from torch's by a few ulps
        tol = 0 if exact else 16 * _eps(dtype) * max(scale, 1.0)
        diff = (ema - hand[i]).abs().max().item() if ema.numel() else 0.0
        assert diff <= tol, f"average {i}: max |diff| = {diff:.3g} > {tol:.3g}"


def test_ema_state_dict_round_trip_and_continue():
    """With ema_decay, the state dict has one more key, "ema" (float32 for bf16 params after
    torch.save/torch.load and load_state_dict); a restored optimizer continues exactly."""
    ps = [p.bfloat16() for p in _make_params(torch.float32, "cpu")]
    pa, pb = _clone_params(ps), _clone_params(ps)
    a = FusedSGD(pa, lr=0.1, momentum=0.9, ema_decay=0.9)
    b = FusedSGD(pb, lr=0.1, momentum=0.9, ema_decay=0.9)
    for step in range(6):
        _set_grads(pa, pb, step)
        a.step()
        b.step()
    sd = _roundtrip(a.state_dict())
    ref_keys = torch.optim.SGD(_clone_params(ps), lr=0.1, momentum=0.9).state_dict()["param_groups"][0].keys()
    assert sd["param_groups"][0].keys() == ref_keys
    assert all(set(s) == {"momentum_buffer", "ema"} for s in sd["state"].values())
    assert all(s["ema"].dtype == torch.float32 for s in sd["state"].values())
    pc = _clone_params([p.detach() for p in pa])
    c = FusedSGD(pc, lr=1.0, ema_decay=0.9)
    c.load_state_dict(sd)
    for p, q in zip(pa, pc):
        assert c.state[q]["ema"].dtype == torch.float32
        assert torch.equal(c.state[q]["ema"], a.state[p]["ema"])
    for step in range(6, 10):
        _set_grads(pc, pb, step)
        c.step()
        b.step()
    for p, q in zip(pb, pc):
        assert torch.equal(p, q)
        assert torch.equal(b.state[p]["ema"], c.state[q]["ema"])
    # torch.optim.SGD loads it too (the extra key rides along) and continues the same.
    pt = _clone_params([p.detach() for p in pa])
    t = torch.optim.SGD(pt, lr=1.0)
    t.load_state_dict(sd)
    assert t.param_groups[0]["lr"] == 0.1


def test_load_state_dict_keeps_the_backend_and_ema_decay():
    p = torch.randn(3, requires_grad=True)
    opt = FusedSGD([p], lr=0.1, backend="reference", ema_decay=0.5)
    opt.load_state_dict(torch.optim.SGD([torch.randn(3, requires_grad=True)], lr=0.2).state_dict())
    assert opt.backend == "reference" and opt.ema_decay == 0.5 and opt.param_groups[0]["lr"] == 0.2


def test_without_ema_the_state_has_no_extra_key():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = FusedSGD([p], lr=0.1, momentum=0.9)
    opt.step()
    assert set(opt.state[p]) == {"momentum_buffer"}
    assert opt.ema_decay is None
    with pytest.raises(RuntimeError, match="construct it with ema_decay"):
        opt.ema_parameters()
    with pytest.raises(RuntimeError, match="construct it with ema_decay"):
        with opt.swap_ema():
            pass


def test_swap_ema_swaps_in_and_back():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    frozen = model[1].bias  # never gets a gradient: no average, left alone
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, ema_decay=0.5)
    for _ in range(3):
        model[0](torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    trained = [p.detach().clone() for p in model.parameters()]
    emas = opt.ema_parameters()
    assert emas[3] is not frozen and torch.equal(emas[3], frozen)  # unstepped: its own value
    with opt.swap_ema():
        for p, e in zip(model.parameters(), emas):
            assert torch.equal(p, e.to(p.dtype))
        assert not torch.equal(model[0].weight, trained[0])
        with pytest.raises(RuntimeError, match="inside swap_ema"):
            opt.step()
    for p, t in zip(model.parameters(), trained):
        assert torch.equal(p, t)
    with pytest.raises(KeyError):
        with opt.swap_ema():
            raise KeyError("evaluation failed")
    for p, t in zip(model.parameters(), trained):
        assert torch.equal(p, t)
    opt.step()  # allowed again


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), 2])
def test_bad_ema_decay(decay):
    with pytest.raises(ValueError, match=r"FusedSGD: ema_decay must be in \[0, 1\)"):
        FusedSGD([torch.zeros(2, requires_grad=True)], lr=0.1, ema_decay=decay)


def test_ema_decay_type_and_copies():
    with pytest.raises(TypeError, match="ema_decay must be a float"):
        FusedSGD([torch.zeros(2, requires_grad=True)], lr=0.1, ema_decay=True)
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = FusedSGD([p], lr=0.1, ema_decay=0.9)
    opt.step()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt)), FusedSGD.from_optimizer(opt)):
        assert other.ema_decay == 0.9
        q = other.param_groups[0]["params"][0]
        assert torch.equal(other.state[q]["ema"], opt.state[p]["ema"])
    assert FusedSGD.from_optimizer(torch.optim.SGD([p], lr=0.1), ema_decay=0.5).ema_decay == 0.5
