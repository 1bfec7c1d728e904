"""A full disk while saving, and a loss that turns NaN mid-run: the run stops with one sentence that
says what was kept, the last good checkpoint still loads, metrics.jsonl holds the finished epochs only,
and --resume ends where an uninterrupted run ends.

ENOSPC is raised by the fault hooks (faults_util) inside torch.save (after half the bytes), at an
os.replace, or at the metrics rewrite; NaN by a training forward that returns NaN logits.
"""

import os
import re
import shutil

import pytest
import torch

import faults_util as fu
from vit.factory import load_model
from vit.loading.project import read_training_checkpoint
from vit import run_folder

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
    last = os.path.join(run_dir, run_folder.LAST)
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


# -----------------------------------------------------------------------------
# a real full disk: a small tmpfs, where torch.save's zip writer raises RuntimeError, not OSError

# tmpfs sizes in units of one last.pt: before any checkpoint, in best.pt / best_hf / the first last.pt,
# in a later epoch's last.pt (the previous one must survive), and roomy enough to finish
DISK_SIZES = (0.05, 1.2, 1.5, 2.5, 3.2, 6.0)


def leftovers(run_dir):
    """Temp files and folders a failed write must not leave (atomic_write's .tmp, save_hf's .tmp/.old)."""
    return [n for n in os.listdir(run_dir) if n.endswith((".tmp", ".old"))] if os.path.isdir(run_dir) else []


def check_full_disk_run(r, run_dir):
    """Exit 0, or one sentence about the full disk (exit 2) that says truthfully what to do; then every
    checkpoint on the disk loads and metrics.jsonl holds no epoch its last.pt does not."""
    last = os.path.join(run_dir, run_folder.LAST)
    if r.returncode != 0:
        line = fu.assert_clean_refusal(r)
        assert "No space left on device" in line or "os error 28" in line, line
        assert ("--resume" in line) == os.path.isfile(last), line  # only a run with a last.pt can resume
    assert not leftovers(run_dir), f"left behind: {leftovers(run_dir)}"
    for name in (run_folder.BEST, run_folder.LAST):
        if os.path.isfile(os.path.join(run_dir, name)):
            load_model(os.path.join(run_dir, name), torch.device("cpu"))
    if os.path.isfile(last):
        epochs = [h["epoch"] for h in fu.read_metrics(run_dir)]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) <= read_training_checkpoint(last)["epoch"]
        return read_training_checkpoint(last)["epoch"]
    return 0


def test_a_real_full_disk_at_several_sizes_keeps_the_previous_checkpoint(tmp_path, folder, reference):
    outcomes = {}
    for k, units in enumerate(DISK_SIZES):
        size = int(units * reference["last_bytes"])
        with fu.small_disk(size) as (disk, why):
            if disk is None:
                pytest.skip(f"no small filesystem can be mounted here (not root, and user namespaces refused: {why})")
            run_dir = os.path.join(disk, "run")
            params = fu.write_params(tmp_path / f"params{k}.json", fu.tiny_params(folder, run_dir, epochs=EPOCHS))
            r = fu.run(["--params", params], tmp_path)
            epochs = check_full_disk_run(r, run_dir)
            outcomes[units] = (r.returncode, epochs)
            if r.returncode == 2 and epochs >= 1 and "resumed" not in outcomes:
                # the disk is freed (the run folder moves to a roomy one): --resume ends as if nothing happened
                moved = tmp_path / "resumed"
                shutil.copytree(run_dir, moved)
                params = fu.write_params(tmp_path / "resume.json", fu.tiny_params(folder, moved, epochs=EPOCHS))
                assert fu.run(["--params", params, "--resume"], tmp_path).returncode == 0
                fu.assert_same_as(reference, str(moved), f"full disk of {size} bytes")
                outcomes["resumed"] = units
        fu.record("fulldisk", f"a real {size:,}-byte tmpfs: exit {r.returncode}, {epochs} epoch(s) kept, no temp file", 1)
    codes = [outcomes[u] for u in DISK_SIZES]
    assert (2, 0) in codes, f"no size failed before the first last.pt: {outcomes}"
    assert any(code == 2 and epochs >= 1 for code, epochs in codes), f"no size failed after a last.pt was kept: {outcomes}"
    assert (0, EPOCHS) in codes, f"no size was big enough to finish: {outcomes}"
    assert "resumed" in outcomes
