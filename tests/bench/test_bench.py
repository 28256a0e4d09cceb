"""The benchmark machinery (bitfast.bench) on tiny sizes: factories, floors, GB/s, skips,
the table and the JSON/markdown reports, and the ``bitfast bench`` command."""

import json
import math

import pytest
import torch

from bitfast import bench, cli
from bitfast.bench import harness
from bitfast.bench.ops import weight_standardize as ws_bench

TINY = {
    "group_norm_relu": (2, 64, 5, 5),
    "batch_norm_relu": (2, 8, 5, 5),
    "weight_standardize": [(8, 4, 3, 3), (16, 8, 1, 1)],
    "sgd_momentum": [(7,), (3, 5)],
}


def _spec(op, impl, mode="full", dtype="fp32", layout="nchw"):
    if op in ("weight_standardize", "sgd_momentum"):
        layout = "-"
    return bench.Spec(op, "tiny", dtype, layout, mode, impl)


@pytest.mark.parametrize("op", ["group_norm_relu", "batch_norm_relu", "weight_standardize"])
@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("impl", ["reference", "eager"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_norm_and_ws_factories_check_and_run(op, mode, impl, layout):
    case = bench.make_case(_spec(op, impl, mode, layout=layout), "cpu", shape=TINY[op])
    case.check()
    out = case.fn()
    assert out is not None
    assert case.bytes_floor > 0


def test_floors_follow_perf_md():
    n, c, h, w = TINY["group_norm_relu"]
    numel = n * c * h * w
    fwd = bench.make_case(_spec("group_norm_relu", "eager", "fwd", "bf16"), "cpu", shape=TINY["group_norm_relu"])
    bwd = bench.make_case(_spec("group_norm_relu", "eager", "bwd", "bf16"), "cpu", shape=TINY["group_norm_relu"])
    assert fwd.bytes_floor == 2 * numel * 2 + 2 * c * 4  # read x, write y (bf16) + params
    assert bwd.bytes_floor == 3 * numel * 2 + 4 * c * 4  # read x, dy, write dx + params, grads
    sgd = bench.make_case(_spec("sgd_momentum", "sgd_foreach", "step"), "cpu", shape=TINY["sgd_momentum"])
    assert sgd.bytes_floor == 20 * (7 + 15)  # 20 B/param in float32
    ws = bench.make_case(_spec("weight_standardize", "eager", "fwd"), "cpu", shape=TINY["weight_standardize"])
    assert ws.bytes_floor == 2 * 4 * (8 * 4 * 9 + 16 * 8)


@pytest.mark.parametrize("impl", ["reference", "cpp", "sgd_foreach", "sgd_fused"])
def test_sgd_factory(impl):
    spec = _spec("sgd_momentum", impl, "step")
    if bench.skip_reason(spec, "cpu"):
        pytest.skip(bench.skip_reason(spec, "cpu"))
    case = bench.make_case(spec, "cpu", shape=TINY["sgd_momentum"])
    case.check()
    case.fn()


def test_check_catches_a_wrong_result():
    x, w, b = torch.randn(2, 64, 5, 5), torch.ones(64), torch.zeros(64)
    spec = _spec("group_norm_relu", "eager", "fwd")

    def wrong(*args):
        return bench.eager_group_norm_relu(*args) * 1.1

    def expected(args, dy, mode):
        return bench.eager_group_norm_relu(*[a.double() for a in args])

    _fn, check = harness.autograd_modes(spec, "cpu", wrong, [((x, w, b), (x, w, b), None)], expected)
    with pytest.raises(AssertionError, match="differs from the float64 reference"):
        check()


def test_skips_carry_reasons():
    # The Triton backend on CPU is never timed, and says why.
    why = bench.skip_reason(_spec("weight_standardize", "triton"), "cpu")
    assert why and "triton" in why
    why = bench.skip_reason(_spec("group_norm_relu", "cuda"), "cpu")
    assert why and "cuda" in why
    with pytest.raises(bench.Skip):
        bench.make_case(_spec("group_norm_relu", "cuda"), "cpu", shape=TINY["group_norm_relu"])
    assert "compile" in bench.skip_reason(bench.Spec("train_step", "x", "fp32", "channels_last", "step", "compile"), "cpu", quick=True)
    for impl in ("compile-max-autotune", "compile-reduce-overhead"):  # GPU-only compile modes
        why = bench.skip_reason(bench.Spec("train_step", "x", "fp32", "channels_last", "step", impl), "cpu")
        assert why and "GPU only" in why
        assert bench.skip_reason(bench.Spec("train_step", "x", "bf16", "channels_last", "step", impl), "cuda") is None
    spec = bench.Spec("train_step", "x", "fp32", "channels_last", "step", "bitfast-compile")
    plain = bench.Spec("train_step", "x", "fp32", "channels_last", "step", "compile")
    assert bench.skip_reason(spec, "cpu", quick=True) == bench.skip_reason(plain, "cpu", quick=True)


def test_train_step_variants_build_the_models_they_name():
    """bitfast-compile is bitfast's model and FusedSGD under torch.compile (a tiny model here,
    run for real); the compile-<mode> baselines compile the eager model in that mode."""
    import torch

    from bitfast.bench.ops.train_step import COMPILE_MODES, train_model

    case = bench.make_case(bench.Spec("train_step", "x", "fp32", "channels_last", "step", "bitfast-compile"), "cpu",
                           shape=("bit_tiny", 2, 32))
    case.check()  # compiles (inductor), trains one step, checks the loss
    model, opt = train_model("bitfast-compile", "bit_tiny", "cpu", channels_last=False)
    assert hasattr(model, "_orig_mod") and type(opt).__name__ == "FusedSGD"
    seen = []
    real = torch.compile
    try:
        torch.compile = lambda m, **kw: seen.append(kw.get("mode")) or m
        for impl in COMPILE_MODES:
            _, opt = train_model(impl, "bit_tiny", "cpu", channels_last=False)
            assert isinstance(opt, torch.optim.SGD)
    finally:
        torch.compile = real
    assert seen == [None, "max-autotune-no-cudagraphs", "reduce-overhead"]


def test_cudagraphs_variant_is_gpu_only():
    spec = bench.Spec("train_step", "x", "fp32", "channels_last", "step", "bitfast-cudagraphs")
    assert "bitfast-cudagraphs" in bench.implementations("train_step")
    assert bench.skip_reason(spec, "cpu") == "bitfast-cudagraphs: GPU only (the step is captured in a CUDA graph)"
    with pytest.raises(bench.Skip):
        bench.make_case(spec, "cpu", shape=("bit_tiny", 2, 32))


@pytest.mark.cuda
def test_cudagraphs_variant_replays_its_graph():
    """bitfast-cudagraphs warms up and captures while the case is built; timing calls replay."""
    case = bench.make_case(bench.Spec("train_step", "x", "bf16", "channels_last", "step", "bitfast-cudagraphs"),
                           "cuda", shape=("bit_tiny", 4, 32))
    case.check()
    case.fn()


def test_grid_covers_every_backend_and_baseline():
    for op in bench.OPS:
        specs = bench.grid(op, "cpu", quick=True)
        impls = {s.impl for s in specs}
        assert set(bench.BASELINES[op]) <= impls
        if op != "train_step":
            assert set(bench.implementations(op)) == impls
        assert all(s.mode in bench.MODES[op] for s in specs)
    cuda = bench.shapes("group_norm_relu", "cuda")
    assert "R50x1 s1 mid 128x64x56x56" in cuda and any(k.startswith("R101x3") for k in cuda)


def _result(impl, t, baseline, **kw):
    return bench.Result("group_norm_relu", "s", "bf16", "nchw", "fwd", impl, baseline, [t, t * 1.1], **kw)


def test_gbps_pct_and_speedups():
    r = _result("cuda", 0.002, False, bytes_floor=4_000_000, copy_gbps=4.0)
    assert math.isclose(r.gbps, 2.0)  # floor / median
    assert math.isclose(r.pct_copy, 50.0)
    assert math.isclose(r.spread, 0.1)
    rs = [r, _result("eager", 0.006, True, bytes_floor=4_000_000), _result("compile", 0.003, True)]
    ups = bench.speedups(rs)
    assert math.isclose(ups[0]["eager"], 3.0) and math.isclose(ups[0]["compile"], 1.5)
    assert "eager" not in ups[1] and "best compile" not in ups[0]  # one compiled baseline: nothing to pick
    rs.append(_result("compile-max-autotune", 0.0025, True))
    assert math.isclose(bench.speedups(rs)[0]["best compile"], 1.25)  # the fastest compiled baseline
    step = bench.Result("train_step", "s", "bf16", "channels_last", "step", "bitfast", False, [0.5], items=128)
    assert math.isclose(step.img_per_s, 256.0) and step.gbps is None


def test_table_json_markdown():
    rs = [_result("reference", 0.002, False, bytes_floor=4_000_000, copy_gbps=8.0, peak_bytes=2**20),
          _result("eager", 0.004, True, bytes_floor=4_000_000, copy_gbps=8.0)]
    table = bench.format_table(rs)
    lines = table.splitlines()
    assert lines[0].startswith("| op") and "GB/s" in lines[0] and "% copy" in lines[0] and "speed-up" in lines[0]
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # aligned columns
    assert "eager 2.00x" in lines[2] and "2.000" in lines[2] and "25" in lines[2]
    skipped = [(_spec("group_norm_relu", "cuda"), "cuda: not here")]
    meta = {"device": "cpu: test", "date": "today", "command": "bitfast bench"}
    data = json.loads(bench.to_json(meta, rs, skipped))
    assert data["meta"]["command"] == "bitfast bench"
    assert data["results"][0]["gbps"] == pytest.approx(2.0) and data["results"][0]["baseline"] is False
    assert data["skipped"][0]["reason"] == "cuda: not here"
    md = bench.to_markdown(meta, rs, skipped)
    assert "# bitfast bench" in md and table in md and "cuda (1 cases): cuda: not here" in md


def test_time_fn_and_copy_bandwidth():
    samples = bench.time_fn(lambda: torch.ones(10).sum(), "cpu", min_time=0, min_reps=3, max_reps=3, warmup=1)
    assert len(samples) == 3 and all(s > 0 for s in samples)
    assert bench.copy_bandwidth("cpu", 2**20) > 0


def test_progress_bar(capsys):
    import io

    stream = io.StringIO()
    bar = bench.Progress(2, stream=stream)
    bar.step("a")
    bar.step("b")
    out = stream.getvalue().splitlines()
    assert out[0].startswith("[###") and "1/2" in out[0] and "2/2" in out[1]


def test_cli_bench_writes_reports(tmp_path, capsys, monkeypatch):
    # One tiny op run end to end through the command (shapes shrunk for speed).
    monkeypatch.setitem(ws_bench.SETS, ("cpu", True), ["R50x1 s1 conv2 3x3"])
    monkeypatch.setattr(harness, "_compile_policy", lambda spec, device, quick: "compile: not in this test")
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = cli.main(["bench", "--quick", "--ops", "weight_standardize", "--runs", "1", "--no-progress",
                   "--json", str(js), "--markdown", str(md)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| op" in out and "weight_standardize" in out and "eager" in out
    data = json.loads(js.read_text())
    assert data["meta"]["command"].startswith("bitfast bench --quick")
    assert {r["impl"] for r in data["results"]} >= {"reference", "eager"}
    assert "Not measured" in md.read_text() and "compile: not in this test" in md.read_text()
    assert cli.main(["bench", "--ops", "nope"]) == 2


def _between_markers(path):
    text = open(path).read()
    begin, end = "<!-- bench-ops:begin -->", "<!-- bench-ops:end -->"
    assert begin in text and end in text, f"{path} has no bench-ops markers"
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/README.md"])
def test_op_tables_of_the_docs_are_the_registry(doc):
    """The op tables of the READMEs are exactly bench.ops_table() (regenerate them with
    `bitfast bench --list` when the registry changes)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert _between_markers(os.path.join(root, doc)) == bench.ops_table()


def test_the_registry_drives_the_cli_and_the_benchmark_files(capsys):
    assert bench.OPS == bench.op_names() and "group_norm_relu_add" in bench.OPS
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(op in help_text for op in bench.OPS)
    assert cli.main(["bench", "--list"]) == 0
    assert capsys.readouterr().out.strip() == bench.ops_table()
    with pytest.raises(ValueError, match="registered twice"):
        bench.register(bench.definition("sgd_momentum"))


def test_compiled_baseline_runs_its_backward_again():
    """The bwd mode replays one graph's backward (retain_graph): the compiled baseline must
    allow it (compiled without donated buffers), on every call after the first too."""
    spec = bench.Spec("weight_standardize", "R50x1 s1 conv2 3x3", "fp32", "-", "bwd", "compile")
    case = bench.make_case(spec, "cpu")  # one 64x64x3x3 weight
    case.check()
    case.fn()
    case.fn()


def test_a_failing_case_is_reported_and_the_run_goes_on(monkeypatch, capsys):
    """A case that raises (a compile or a CUDA graph capture failing on the machine) costs its
    row, not the run: it is listed as FAILED with its error, the other cases are measured, and
    ``bitfast bench`` exits 1. ``--impls`` picks implementations."""
    from bitfast.bench import driver

    real = driver.make_case

    def failing_reference(spec, device, quick=False):
        if spec.impl == "reference":
            raise RuntimeError("capture failed")
        return real(spec, device, quick=quick)

    monkeypatch.setattr(driver, "make_case", failing_reference)
    meta, results, skipped = bench.run(["sgd_momentum"], device="cpu", quick=True, runs=1, progress=False,
                                       impls=["reference", "sgd_foreach"])
    assert results and {r.impl for r in results} == {"sgd_foreach"}
    assert {spec.impl for spec, _ in skipped} == {"reference"}
    assert all(why == "FAILED: RuntimeError: capture failed" for _, why in skipped)
    assert cli.main(["bench", "--ops", "sgd_momentum", "--impls", "reference,sgd_foreach", "--quick", "--runs", "1",
                     "--no-progress", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: capture failed" in out and "case(s) FAILED" in out
    assert cli.main(["bench", "--ops", "sgd_momentum", "--impls", "nope"]) == 2
