import os

import pytest
import torch

# Tests must be reproducible and must not fight over the 2 cores with Ray workers they start.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
