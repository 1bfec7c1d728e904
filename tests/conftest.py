"""Shared test set-up: CPU, fp32, deterministic, one thread (tiny models: threading only adds overhead)."""

import os

# CPU even on a GPU machine, for this process and every run it starts (fork server, torchrun), set
# before anything initialises CUDA; VIT_TEST_GPU=1 lets tests/test_cuda.py see the GPU instead
if os.environ.get("VIT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

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
