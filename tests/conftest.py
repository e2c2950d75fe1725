import sys
from pathlib import Path

import pytest
import torch

# The shared test helpers live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, restoring the count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
