"""Shared test set-up.

TRITON_INTERPRET=1 is set here, before anything imports a Triton kernel module, so that the
``triton`` backend runs on CPU tensors (that is how CI tests the Triton kernels).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import bitfast  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny batches gain nothing from a second thread, a busy
    machine slows OpenMP a lot, and bit-exact comparisons need one thread count. Modules use
    it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a whole test module, its module-scoped fixtures included."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def devices() -> list[str]:
    """Devices to run device-generic tests on: cpu, and cuda when present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
