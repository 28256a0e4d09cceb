"""Launch configurations of the GroupNorm+ReLU and SGD kernels: every configuration of the
sweep (``bitfast.bench.sweep``, run by ``tools/kernel_sweep.py``) computes the op.

Triton: each ``GroupNormConfig`` / ``SgdConfig`` of the sweep's grids against the float64
reference on small random inputs, NCHW and channels_last, with the residual add too (the
interpreter on a CPU, compiled on a GPU); the default configuration is the op layer's
launch, bit for bit. CUDA: each launch setting of the sweep on the native ops (GPU only,
marked ``cuda``), and the settings' C functions themselves, built from
csrc/cuda/launch_config.cpp with the host compiler (CPU).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from bitfast import _native
from bitfast.bench import sweep
from bitfast.ops import reference
from tests.ops._native_cases import make_activation, norm_params, require
from tests.ops._util import assert_parity

# (shape, groups): stage 1's two channels per group, a wide group, odd sizes
GN_CASES = [((2, 64, 3, 5), 32), ((2, 128, 2, 3), 2), ((3, 24, 3, 3), 4)]


def _gn_kernels():
    pytest.importorskip("triton")
    require("triton", "group_norm_relu", "cpu" if not torch.cuda.is_available() else "cuda")
    from bitfast.kernels import group_norm_relu as k

    return k


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _gn_reference(x, w, b, g, groups, gs=None):
    x64, w64, b64 = x.double(), w.double(), b.double()
    y64, mean64, rstd64 = reference.group_norm_relu_forward(x64, w64, b64, groups, 1e-5, True)
    grads64 = reference.group_norm_relu_add_backward(g.double(), None if gs is None else gs.double(), x64, w64, b64,
                                                     mean64, rstd64, groups, True)
    yb, mean_b, rstd_b = reference.group_norm_relu_forward(x, w, b, groups, 1e-5, True)
    grads_b = reference.group_norm_relu_add_backward(g, gs, x, w, b, mean_b, rstd_b, groups, True)
    return (y64, mean64, rstd64), grads64, (yb, mean_b, rstd_b), grads_b


def _check(fwd_out, bwd_out, ref, dtype):
    (y64, m64, r64), grads64, (yb, mb, rb), grads_b = ref
    for name, got, want, base, dt in zip(("y", "mean", "rstd"), fwd_out, (y64, m64, r64), (yb, mb, rb),
                                         (dtype, torch.float32, torch.float32)):
        assert_parity(got, want, base, dt, name)
    for name, got, want, base in zip(("grad_x", "grad_weight", "grad_bias"), bwd_out, grads64, grads_b):
        assert_parity(got, want, base, dtype, name)


@pytest.mark.parametrize("config", sweep.TRITON_GN_CONFIGS(), ids=lambda c: c.label())
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape,groups", GN_CASES, ids=["cg2", "cg64", "cg6-odd"])
def test_triton_gn_config(config, layout, shape, groups):
    """Each sweep configuration of the Triton GroupNorm+ReLU, forward and backward, against
    the float64 reference (a configuration whose groups per program does not divide the
    groups refuses the input with a ValueError)."""
    k = _gn_kernels()
    dev = _device()
    x = make_activation(shape, torch.float32, layout, dev)
    w, b = norm_params(shape[1], dev)
    g = torch.randn(shape, device=dev).contiguous(memory_format=reference.memory_format(x))
    if groups % config.groups_per_program:
        with pytest.raises(ValueError, match="does not divide num_groups"):
            k.group_norm_relu_fwd(x, w, b, groups, 1e-5, True, config=config)
        return
    y, mean, rstd = k.group_norm_relu_fwd(x, w, b, groups, 1e-5, True, config=config)
    assert y.is_contiguous(memory_format=reference.memory_format(x))
    grads = k.group_norm_relu_bwd(g, x, w, b, mean, rstd, groups, True, config=config)
    _check((y, mean, rstd), grads, _gn_reference(x, w, b, g, groups), torch.float32)


@pytest.mark.parametrize("config", [c for c in sweep.TRITON_GN_CONFIGS() if c.groups_per_program > 1],
                         ids=lambda c: c.label())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_gn_add_multi_group(config, dtype):
    """The multi-group kernels' residual branches: the sum a + b stored, bit for bit, and
    normalized; grad_sum added to the input gradient."""
    k = _gn_kernels()
    dev = _device()
    shape, groups = (2, 64, 3, 5), 32
    a = make_activation(shape, dtype, "channels_last", dev)
    bb = make_activation(shape, dtype, "channels_last", dev)
    w, b = norm_params(64, dev)
    s, y, mean, rstd = k.group_norm_relu_add_fwd(a, bb, w, b, groups, 1e-5, True, config=config)
    assert torch.equal(s, a + bb)
    g = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    gs = torch.randn(shape, device=dev).to(dtype).contiguous(memory_format=torch.channels_last)
    grads = k.group_norm_relu_add_bwd(g, gs, s, w, b, mean, rstd, groups, True, config=config)
    _check((y, mean, rstd), grads, _gn_reference(s, w, b, g, groups, gs), dtype)


def test_triton_gn_default_config_is_the_op():
    """The default configuration is what the op layer launches: the same bits."""
    k = _gn_kernels()
    import bitfast

    dev = _device()
    x = make_activation((2, 64, 3, 5), torch.float32, "channels_last", dev)
    w, b = norm_params(64, dev)
    y = k.group_norm_relu_fwd(x, w, b, 32, 1e-5, True, config=k.GroupNormConfig())[0]
    assert torch.equal(y, bitfast.ops.group_norm_relu(x, 32, w, b, backend="triton"))


def test_config_errors():
    """Bad configurations name the field, the value and what is expected."""
    pytest.importorskip("triton")
    from bitfast.kernels.group_norm_relu import GroupNormConfig
    from bitfast.kernels.sgd_momentum import SgdConfig

    for kw, field in (({"tile": 1000}, "tile"), ({"groups_per_program": 3}, "groups_per_program"),
                      ({"num_warps": 64}, "num_warps"), ({"num_stages": 0}, "num_stages")):
        with pytest.raises(ValueError, match=f"GroupNormConfig: {field}"):
            GroupNormConfig(**kw)
    for kw, field in (({"block": 8}, "block"), ({"blocks_per_chunk": 0}, "blocks_per_chunk"),
                      ({"num_warps": 3}, "num_warps")):
        with pytest.raises(ValueError, match=f"SgdConfig: {field}"):
            SgdConfig(**kw)
    assert GroupNormConfig().label() == "default"
    assert GroupNormConfig(tile=2048, groups_per_program=2).label() == "tile=2048,groups_per_program=2"


@pytest.mark.parametrize("config", sweep.TRITON_SGD_CONFIGS(), ids=lambda c: c.label())
def test_triton_sgd_config(config):
    """Each sweep configuration of the Triton SGD step gives the default's values, bit for
    bit, and the reference's within rounding; an unaligned tensor turns the alignment hint
    off."""
    pytest.importorskip("triton")
    require("triton", "sgd_momentum", "cpu" if not torch.cuda.is_available() else "cuda")
    from bitfast.kernels import sgd_momentum as k

    dev = _device()
    shapes = [(37,), (8, 3, 3, 3), (5000,), (64,)]
    gen = torch.Generator().manual_seed(0)
    base = [[torch.randn(s, generator=gen).to(dev) for s in shapes] for _ in range(3)]
    unaligned = torch.randn(101, generator=gen).to(dev)[1:]  # a 4-byte offset
    base = [ts + [t] for ts, t in zip(base, (unaligned, unaligned.clone(), unaligned.clone()))]
    runs = []
    for cfg in (k.SgdConfig(), config):
        p, g, m = ([t.clone() for t in ts] for ts in base)
        k.sgd_momentum_(p, g, m, 0.1, 0.9, 0.0, 1e-4, False, False, False, config=cfg)
        runs.append(p + m)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    p64, g64, m64 = ([t.double() for t in ts] for ts in base)
    reference.sgd_momentum_(p64, g64, m64, 0.1, 0.9, 0.0, 1e-4, False, False, False)
    for got, want in zip(runs[1], p64 + m64):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# CUDA launch settings
# ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("knobs", sweep.CUDA_GN_KNOBS, ids=sweep._label)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape,groups", [((2, 64, 28, 28), 32), ((2, 2048, 7, 7), 32), ((2, 256, 56, 56), 1)],
                         ids=["cg2", "cg64", "two-phase"])
def test_cuda_gn_knobs(knobs, layout, dtype, shape, groups):
    """The native CUDA GroupNorm+ReLU under each launch setting of the sweep, forward and
    backward, against the float64 reference (one group of 256 x 56 x 56 does not fit in
    shared memory: the two-phase forward)."""
    require("cuda", "group_norm_relu", "cuda")
    x = make_activation(shape, dtype, layout, "cuda")
    w, b = norm_params(shape[1], "cuda")
    g = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=reference.memory_format(x))
    with _native.cuda_launch_config(**knobs):
        y, mean, rstd = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, groups, 1e-5, True)
        grads = torch.ops.bitfast.native_group_norm_relu_bwd(g, x, w, b, mean, rstd, groups, True)
    assert y.is_contiguous(memory_format=reference.memory_format(x))
    _check((y, mean, rstd), grads, _gn_reference(x, w, b, g, groups), dtype)


@pytest.mark.cuda
def test_cuda_default_knobs_are_bitwise_the_builtin_launch():
    """Setting every knob to 0 is the built-in launch: the same bits as no setting."""
    require("cuda", "group_norm_relu", "cuda")
    x = make_activation((2, 64, 28, 28), torch.bfloat16, "channels_last", "cuda")
    w, b = norm_params(64, "cuda")
    before = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, 32, 1e-5, True)
    with _native.cuda_launch_config(**{name: 0 for name in _native.cuda_launch_knobs()}):
        after = torch.ops.bitfast.native_group_norm_relu_fwd(x, w, b, 32, 1e-5, True)
    for a, c in zip(before, after):
        assert torch.equal(a, c)


@pytest.mark.cuda
@pytest.mark.parametrize("knobs", sweep.CUDA_SGD_KNOBS, ids=sweep._label)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_sgd_knobs(knobs, dtype):
    """The native CUDA SGD step under each launch setting of the sweep gives the built-in
    launch's values bit for bit (aligned and unaligned tensors, with a float32 average)."""
    require("cuda", "sgd_momentum", "cuda")
    shapes = [(37,), (64, 3, 7, 7), (300_001,), (256,)]
    gen = torch.Generator().manual_seed(0)
    base = [[torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes] for _ in range(3)]
    unaligned = torch.randn(1001, generator=gen).to("cuda", dtype)[1:]
    base = [ts + [unaligned.clone()] for ts in base]
    ema = [t.float() for t in base[0]]
    runs = []
    for kn in ({}, knobs):
        p, g, m = ([t.clone() for t in ts] for ts in base)
        e = [t.clone() for t in ema]
        with _native.cuda_launch_config(**kn):
            torch.ops.bitfast.native_sgd_momentum_(p, g, m, 0.1, 0.9, 0.0, 1e-4, False, False, False, None, e, 0.99)
        runs.append(p + m + e)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_launch_knob_errors():
    """Unknown names and values outside a setting's range raise ValueError; a failed
    setting inside cuda_launch_config leaves the previous values."""
    require("cuda", "sgd_momentum", "cuda")
    before = _native.cuda_launch_knobs()
    with pytest.raises(ValueError, match="unknown setting"):
        _native.set_cuda_launch_knob("no_such_knob", 1)
    with pytest.raises(ValueError, match="outside the values"):
        _native.set_cuda_launch_knob("sgd_threads", 100)
    with pytest.raises(ValueError):
        with _native.cuda_launch_config(sgd_threads=512, gn_fwd_threads=7):
            pass
    assert _native.cuda_launch_knobs() == before


def test_launch_knob_c_functions(tmp_path, monkeypatch):
    """csrc/cuda/launch_config.cpp, built with the host compiler (no CUDA needed), behind
    bitfast._native's wrappers: defaults 0, set and get, validation, restoring."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler found")
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    lib = tmp_path / "liblaunch.so"
    subprocess.run([cxx, "-std=c++20", "-shared", "-fPIC", "-O1", f"-I{root / 'csrc'}",
                    str(root / "csrc" / "cuda" / "launch_config.cpp"), "-o", str(lib)], check=True)
    monkeypatch.setattr(_native, "_cuda_lib", None)
    monkeypatch.setattr(_native, "loaded", lambda name: True)
    monkeypatch.setattr(_native, "_cuda_library_path", lambda: str(lib))
    knobs = _native.cuda_launch_knobs()
    assert set(knobs) >= {k for kn in sweep.CUDA_GN_KNOBS + sweep.CUDA_SGD_KNOBS for k in kn}
    assert all(v == 0 for v in knobs.values())
    with _native.cuda_launch_config(sgd_threads=512, gn_split_target=1024):
        now = _native.cuda_launch_knobs()
        assert now["sgd_threads"] == 512 and now["gn_split_target"] == 1024
    assert _native.cuda_launch_knobs() == knobs
    for name, bad in (("sgd_threads", 100), ("sgd_chunk", 5000), ("gn_fwd_vec_bytes", 4), ("sgd_unroll", 3)):
        with pytest.raises(ValueError, match="outside the values"):
            _native.set_cuda_launch_knob(name, bad)
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        _native.set_cuda_launch_knob("nope", 1)
    assert _native.cuda_launch_knobs() == knobs


def test_sweep_dry_run(tmp_path):
    """The sweep's dry run on tiny shapes: every Triton configuration checked, CUDA
    skipped with a reason, reports written, targets not measured."""
    pytest.importorskip("triton")
    result = sweep.run_sweep("cpu", kernels=("sgd",), min_time=0.01)
    statuses = {(r.impl, r.status.split(":")[0]) for r in result["rows"]}
    assert ("triton", "ok (dry run") in statuses and ("cuda", "skipped") in statuses
    assert not [r for r in result["rows"] if r.status.startswith("FAILED")]
    md, js = sweep.write_reports(result, str(tmp_path))
    assert "## SGD step" in open(md).read()
    assert all(t["status"] == "not measured" for t in result["targets"])


def test_ncu_summary():
    """The key metrics and the limiter of each kernel in ncu's CSV details page."""
    head = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
    rows = [
        ("0", "k_mem", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "85.5"),
        ("0", "k_mem", "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "20.1"),
        ("0", "k_mem", "GPU Speed Of Light Throughput", "Duration", "us", "1,210.3"),
        ("0", "k_mem", "Occupancy", "Achieved Occupancy", "%", "70"),
        ("1", "k_lat", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "30"),
        ("1", "k_lat", "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "25"),
    ]
    text = "==PROF== Connected\n" + head + "".join(",".join(f'"{v}"' for v in r) + "\n" for r in rows)
    out = {k["kernel"]: k for k in sweep.summarize_ncu_csv(text)}
    assert out["k_mem"]["limiter"] == "memory" and out["k_mem"]["duration"] == 1210.3
    assert out["k_mem"]["achieved_occupancy_pct"] == 70.0
    assert out["k_lat"]["limiter"] == "latency"
