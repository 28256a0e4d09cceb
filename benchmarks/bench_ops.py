"""The benchmarks of every op in the registry (``bitfast/bench/ops/<op>.py``): each case of
``bitfast.bench.grid(op, device)`` checked and timed by the ``run_case`` fixture (conftest.py).
A new op's benchmark definition appears here without an edit."""


def test_op(spec, run_case):
    run_case(spec)
