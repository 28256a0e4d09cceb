"""Benchmarks of ``batch_norm_relu``: every backend against the baselines (the case factory is
``bitfast.bench.make_case``, shared with ``bitfast bench``; driver in conftest.py)."""

OP = "batch_norm_relu"  # the grid comes from conftest.pytest_generate_tests (bitfast.bench.grid)


def test_batch_norm_relu(spec, run_case):
    run_case(spec)
