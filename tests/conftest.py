"""Shared test set-up: CPU, fp32, deterministic, few threads (CI has 2 cores)."""

import pytest
import torch

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
