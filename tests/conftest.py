"""Fixtures shared by the test modules."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test on one torch thread: tiny tensors are as fast, immune to the OpenMP stalls of a busy
    machine, and in-process training sums floats in the same order as a torchrun process
    (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
