"""Benchmarks of ``weight_standardize``: every backend against the baselines (the case factory is
``bitfast.bench.make_case``, shared with ``bitfast bench``; driver in conftest.py)."""

OP = "weight_standardize"  # the grid comes from conftest.pytest_generate_tests (bitfast.bench.grid)


def test_weight_standardize(spec, run_case):
    run_case(spec)
