"""pytest-benchmark driver of bitfast's benchmarks (``pytest benchmarks/``).

``bench_ops.py`` parametrizes one test over ``bitfast.bench.grid(op, device)`` of every op in
the registry (``bitfast/bench/ops/``) and hands the Spec to the ``run_case`` fixture, which
builds the case with the op's factory (``bitfast.bench.make_case``, shared with ``bitfast
bench``), skips it with the reason when
it cannot run here, checks it against the float64 reference, measures its peak memory,
times it with ``benchmark.pedantic`` (synchronized on CUDA, after warm-up) and records GB/s,
% of copy bandwidth, img/s, device and versions in ``extra_info``. At the end the same
table as ``bitfast bench`` (with the speed-ups over each baseline) is printed.

``pytest benchmarks/ --benchmark-disable`` runs each case of the ``--quick`` grid once
(check included): the CI smoke test, a minute or two on two cores. A plain ``pytest``
does not collect this directory (testpaths = tests).
"""

from __future__ import annotations

import statistics

import pytest
import torch

from bitfast import bench

DEVICE = bench.default_device()
_RESULTS: list[bench.Result] = []


def _smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


def pytest_generate_tests(metafunc):
    if "spec" in metafunc.fixturenames:
        quick = _smoke(metafunc.config)
        grid = [s for op in bench.OPS for s in bench.grid(op, DEVICE, quick=quick)]
        metafunc.parametrize("spec", grid, ids=[f"{s.op}-{s.id}" for s in grid])


@pytest.fixture(scope="session")
def bench_env(request):
    disabled = _smoke(request.config)
    env = bench.environment(DEVICE)
    env["copy_GBps"] = None if disabled else round(bench.copy_bandwidth(DEVICE), 2)
    return env


@pytest.fixture
def run_case(benchmark, bench_env, request):
    quick = _smoke(request.config)

    def run(spec: bench.Spec) -> None:
        try:
            case = bench.make_case(spec, DEVICE, quick=quick)
        except bench.Skip as exc:
            pytest.skip(str(exc))
        if benchmark.disabled:
            # Smoke run: the check is one call of the case, against the float64 reference.
            case.check()
            benchmark(case.fn)
            return
        peak = bench.check_and_peak(case)
        timed = bench.synced(case.fn, DEVICE)
        # Rounds sized from one warm call so that each case takes about a second.
        t = statistics.median(bench.time_fn(timed, DEVICE, min_time=0, min_reps=1, max_reps=1, warmup=1))
        rounds = max(4, min(200, int(0.6 / max(t, 1e-6))))
        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1 if DEVICE == "cpu" else 3)
        if benchmark.stats is None:  # --benchmark-disable or another plugin disabled timing
            return
        data = list(benchmark.stats.stats.data)
        half = len(data) // 2
        # Two runs: the two halves of the rounds; their medians give the spread.
        medians = [statistics.median(data[:half]), statistics.median(data[half:])] if half else [statistics.median(data)]
        r = bench.Result(spec.op, spec.shape, spec.dtype, spec.layout, spec.mode, spec.impl,
                         bench.is_baseline(spec.op, spec.impl), medians, min(data), case.bytes_floor, case.items, peak,
                         bench_env["copy_GBps"], case.shape_value)
        _RESULTS.append(r)
        benchmark.extra_info.update(
            device=bench_env["device"], versions={k: bench_env[k] for k in ("python", "torch", "cuda", "triton", "bitfast", "timm")},
            shape=spec.shape, shape_value=case.shape_value, dtype=spec.dtype, layout=spec.layout, mode=spec.mode,
            impl=spec.impl, baseline=r.baseline, bytes_floor=case.bytes_floor, median_s=statistics.median(data),
            gbps=r.gbps, copy_gbps=bench_env["copy_GBps"], pct_copy=r.pct_copy, img_per_s=r.img_per_s,
            peak_bytes=peak, run_medians_s=medians,
        )

    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    env = bench.environment(DEVICE)
    terminalreporter.section("bitfast benchmarks: floor bandwidth and speed-ups over the baselines")
    terminalreporter.write_line(f"{env['device']}; torch {env['torch']}, bitfast {env['bitfast']}; "
                                f"time = the lower of the two half-run medians, spread between them")
    terminalreporter.write_line(bench.format_table(_RESULTS))


def pytest_sessionstart(session):
    torch.manual_seed(0)
