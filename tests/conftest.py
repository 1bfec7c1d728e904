"""Shared test set-up: CPU, fp32, deterministic, one thread (tiny models: threading only adds overhead)."""

import pytest
import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    # the fault suite's totals (the README's reliability figures), just above pytest's own last line
    import sys

    fu = sys.modules.get("faults_util")
    line = fu.summary_line() if fu else None
    if line:
        terminalreporter.write_line(line)
