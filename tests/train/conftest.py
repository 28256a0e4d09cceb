"""Fixtures shared by the training tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread_module():
    """One torch thread for a whole test module, its module-scoped fixtures included (tiny
    batches gain nothing from a second thread, and bit-exact comparisons need one count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
