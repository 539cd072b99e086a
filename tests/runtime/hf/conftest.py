"""One CPU thread for these tests: their tensors are tiny, and on a busy machine the thread
synchronisation of small ops costs more than the ops (a 38-token generation: 13 s on 2 threads
under load, under 1 s on one)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
