"""Benchmarks of ``group_norm_relu_add`` (the residual add fused with the next GroupNorm+ReLU):
every backend against the unfused eager and compiled baselines (the case factory is
``bitfast.bench.make_case``, shared with ``bitfast bench``; driver in conftest.py)."""

OP = "group_norm_relu_add"  # the grid comes from conftest.pytest_generate_tests (bitfast.bench.grid)


def test_group_norm_relu_add(spec, run_case):
    run_case(spec)
