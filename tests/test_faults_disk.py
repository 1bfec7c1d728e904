"""A full disk while saving, and a loss that turns NaN mid-run: the run stops with one sentence that
says what was kept, the last good checkpoint still loads, metrics.jsonl holds the finished epochs only,
and --resume ends where an uninterrupted run ends.

ENOSPC is raised by the fault hooks (faults_util) inside torch.save (after half the bytes), at an
os.replace, or at the metrics rewrite; NaN by a training forward that returns NaN logits.
"""

import os
import re

import pytest
import torch

import faults_util as fu
from vit.commands import load_model
from vit.loading import read_training_checkpoint
from vit.train import checkpoint

EPOCHS = 3  # the same tiny run as test_faults_kill, so the session shares one reference run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_disk_data")
    fu.make_folder(root)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder):
    return fu.reference(folder, tmp_path_factory.mktemp("faults_disk_reference"), EPOCHS)


def stop_then_resume(tmp_path, folder, reference, fault, words):
    """Run with `fault`; check the stop, what was kept and the message; resume; compare with the reference."""
    run_dir = tmp_path / "run"
    params = fu.write_params(tmp_path / "params.json", fu.tiny_params(folder, run_dir, epochs=EPOCHS))
    r = fu.run(["--params", params], tmp_path, **fault)
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    m = re.search(r"error: (.*)", r.stderr)
    assert m, r.stderr[-3000:]
    for w in words:
        assert w in m.group(1), f"{w!r} not in {m.group(1)!r}"
    last = os.path.join(run_dir, checkpoint.LAST)
    assert read_training_checkpoint(last)["epoch"] == 1, "the last good checkpoint is not epoch 1's"
    load_model(last, torch.device("cpu"))
    assert [h["epoch"] for h in fu.read_metrics(run_dir)] == [1], "metrics.jsonl must hold the finished epochs only"
    assert not os.path.exists(last + ".tmp"), "a half-written temp file was left behind"
    r = fu.run(["--params", params, "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    fu.assert_same_as(reference, str(run_dir), str(fault))
    return m.group(1)


# a fresh run writes, in epoch 1: best.pt (save 1 / replace 2), best_hf (replace 3), last.pt (save 2 /
# replace 4), metrics (history 2 / replace 5); in epoch 2, with no new best: last.pt (save 3 / replace 6)
@pytest.mark.parametrize("at", ["save:3", "replace:6"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, folder, reference, at):
    message = stop_then_resume(tmp_path, folder, reference, {"at": at, "action": "ENOSPC"},
                               ["last.pt", "No space left on device", "previous", "kept intact", "--resume"])
    assert message.count(". ") == 0, f"not one sentence: {message!r}"
    fu.record("disk", f"ENOSPC at {at}: previous last.pt kept, exact resume", 1)


@pytest.mark.parametrize("at", [
    "replace:3",
    "history:2",
])
def test_disk_full_outside_the_checkpoint_stops_cleanly(tmp_path, folder, at):
    run_dir = tmp_path / "run"
    params = fu.write_params(tmp_path / "params.json", fu.tiny_params(folder, run_dir, epochs=EPOCHS))
    r = fu.run(["--params", params], tmp_path, at=at, action="ENOSPC")
    fu.assert_clean_refusal(r, "No space left on device")
    fu.record("disk", f"ENOSPC at {at}: clean stop", 1)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, folder, reference):
    # forward 6 is epoch 2's second batch (4 batches per epoch)
    message = stop_then_resume(tmp_path, folder, reference, {"nan_at": 6},
                               ["loss became nan", "epoch 2", "last.pt", "intact", "--resume"])
    assert "batch 2/4" in message
    fu.record("disk", "NaN loss at step 6: stopped, epoch 1 checkpoint intact, exact resume", 1)


def test_nan_message_is_on_its_own_line(tmp_path, folder):
    params = fu.write_params(tmp_path / "params.json", fu.tiny_params(folder, tmp_path / "run", epochs=1))
    r = fu.run(["--params", params], tmp_path, nan_at=2)
    fu.assert_clean_refusal(r, "loss became nan")
