"""Shared fixtures of the model tests."""
import pytest
import torch


@pytest.fixture
def single_thread():
    """Tiny ops on a shared 2-core machine: thread hand-offs cost more than the math (30x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
