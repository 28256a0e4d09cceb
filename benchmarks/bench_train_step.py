"""Benchmarks of ``train_step``: every backend against the baselines (the case factory is
``bitfast.bench.make_case``, shared with ``bitfast bench``; driver in conftest.py)."""

OP = "train_step"  # the grid comes from conftest.pytest_generate_tests (bitfast.bench.grid)


def test_train_step(spec, run_case):
    run_case(spec)
