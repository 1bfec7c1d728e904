"""Shared test set-up: CPU, fp32, deterministic, one thread (tiny models: threading only adds overhead)."""

import pytest
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
