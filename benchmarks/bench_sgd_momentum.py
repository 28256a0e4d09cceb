"""Benchmarks of ``sgd_momentum``: every backend against the baselines (the case factory is
``bitfast.bench.make_case``, shared with ``bitfast bench``; driver in conftest.py)."""

OP = "sgd_momentum"  # the grid comes from conftest.pytest_generate_tests (bitfast.bench.grid)


def test_sgd_momentum(spec, run_case):
    run_case(spec)
