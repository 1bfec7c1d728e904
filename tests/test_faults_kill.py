"""Kills and signals: SIGKILL a training at exact points (mid-epoch, in evaluation, inside checkpoint
writes, between the checkpoint and metrics.jsonl), resume each time, and compare with a run that was
never interrupted, bit for bit. SIGINT and SIGTERM must save, exit 128 + signal, and resume exactly.

Every kill point is an event count in the killed process (see faults_util), drawn from a seeded RNG
where it is random, so the suite is deterministic.
"""

import os
import signal
import time

import numpy as np
import pytest
import torch

import faults_util as fu
from vit.factory import load_model
from vit.loading.project import read_training_checkpoint
from vit import run_folder
from vit.train import checkpoint

EPOCHS, STEPS = 3, 4  # 36 training images / batch 8 -> 4 steps per epoch; 9 val images -> 2 eval batches


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_kill_data")
    fu.make_folder(root)
    return root


def setup_run(tmp_path, folder, epochs=EPOCHS, **train):
    """(params path, run folder) for a fresh run in tmp_path."""
    run_dir = tmp_path / "run"
    return fu.write_params(tmp_path / "params.json", fu.tiny_params(folder, run_dir, epochs=epochs, **train)), str(run_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, folder):
    """The uninterrupted run: final weights and metrics lines."""
    return fu.reference(folder, tmp_path_factory.mktemp("faults_reference"), EPOCHS)


def metric_epochs(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return [h["epoch"] for h in fu.read_metrics(run_dir)] if os.path.exists(path) else []


def check_after_kill(run_dir, saved_before, tag):
    """The invariants that hold after any kill. Returns whether a `last` checkpoint exists now."""
    last = os.path.join(run_dir, run_folder.LAST)
    if saved_before:
        assert os.path.isfile(last), f"{tag}: last.pt vanished after a kill"
    if os.path.isfile(last):
        model, info = load_model(last, torch.device("cpu"))  # loadable, whole
        assert info["classes"] == ["class_0", "class_1", "class_2"], tag
        epochs = metric_epochs(run_dir)
        assert epochs == list(range(1, len(epochs) + 1)), f"{tag}: metrics.jsonl epochs {epochs}"
        assert len(epochs) <= read_training_checkpoint(last)["epoch"], f"{tag}: a metrics line outlived its checkpoint"
    return os.path.isfile(last)


def drive(params, run_dir, log_dir, faults, tag):
    """Run with each fault in turn (resuming whenever last.pt exists), then to the end; returns kills survived."""
    kills, saved, lives = 0, False, []
    for fault in [*faults, {}]:
        resume = os.path.isfile(os.path.join(run_dir, run_folder.LAST))
        lives.append((fault.get("at"), read_training_checkpoint(os.path.join(run_dir, run_folder.LAST))["epoch"] if resume else None))
        r = fu.run(["--params", params] + (["--resume"] if resume else []), log_dir, **fault)
        if r.returncode == 0:
            assert "Traceback" not in r.stderr, r.stderr[-3000:]
            break  # the fault point was never reached: the run finished
        assert r.returncode == -signal.SIGKILL, f"{tag} {fault}: exit {r.returncode}\n{r.stderr[-3000:]}"
        kills += 1
        saved = check_after_kill(run_dir, saved, f"{tag} {fault}")
    assert r.returncode == 0
    assert kills == len(faults), f"{tag}: only {kills} of {len(faults)} kill points reached; (fault, resumed epoch): {lives}"
    return kills


def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path, folder, reference):
    # one life per entry; counts restart in each process. A fresh run's epoch 1 writes best.pt (replace:2),
    # best_hf (replace:3), last.pt (replace:4), metrics.jsonl (replace:5; replace:1 is the startup rewrite);
    # a resumed run with no new best writes last.pt (replace:2) and metrics (replace:3).
    # eval 1-2 are one validation pass, eval 3-4 the next (or the end-of-run report)
    rng = np.random.default_rng(0)
    faults = [
        {"at": "step:3"},  # mid epoch 1, nothing saved yet: start again
        {"at": "save:1"},  # torn best.pt.tmp
        {"at": "save:2"},  # torn last.pt.tmp, best.pt already in place
        {"at": "replace:2"},  # best.pt.tmp complete, not yet renamed
        {"at": "replace:3"},  # best_hf.tmp complete, not yet renamed
        {"at": "replace:4"},  # last.pt.tmp complete, not yet renamed
        {"at": "eval:2"},  # inside epoch 1's evaluation
        {"at": "replace:5"},  # last.pt (epoch 1) renamed, metrics.jsonl not yet
        {"at": "step:1"},  # resumed: first step of epoch 2
        {"at": "replace:1"},  # resumed: the startup rewrite of metrics.jsonl
        *[{"at": f"step:{s}"} for s in rng.integers(1, STEPS + 1, size=3)],  # mid epoch 2, seeded
        {"at": "save:1"},  # torn write of epoch 2's last.pt: epoch 1's must survive
        {"at": f"step:{STEPS + rng.integers(1, STEPS)}"},  # mid epoch 3
        {"at": "eval:1"},  # resumed at epoch 2: inside epoch 3's evaluation
        {"at": "replace:2"},  # the final last.pt complete in .tmp, not renamed
        {"at": "eval:3"},  # in the end-of-run report, after everything was saved
        {"at": "eval:2"},  # resuming a finished run, killed in its report again
    ]
    params, run_dir = setup_run(tmp_path, folder)
    kills = drive(params, run_dir, tmp_path, faults, "sigkill")
    fu.assert_same_as(reference, run_dir, "sigkill")
    fu.record("kill", "SIGKILLs survived (bit-exact resume)", kills)


def test_sigkill_with_an_ema_then_resume_is_bit_exact(tmp_path_factory, tmp_path, folder):
    """The EMA of the weights survives kills too: it is saved with them and restored bit for bit."""
    ema = {"ema_decay": 0.9}
    reference = fu.reference(folder, tmp_path_factory.mktemp("faults_ema_reference"), EPOCHS, **ema)
    # eval 1-4 are epoch 1's two passes (the weights, then their EMA); saves: best.pt, last.pt per epoch
    faults = [{"at": "step:2"}, {"at": "eval:3"}, {"at": "save:2"}, {"at": f"step:{STEPS + 1}"}, {"at": "eval:2"}]
    params, run_dir = setup_run(tmp_path, folder, **ema)
    kills = drive(params, run_dir, tmp_path, faults, "sigkill with EMA")
    fu.assert_same_as(reference, run_dir, "sigkill with EMA")
    assert "model_ema" in reference["state"] and "val_acc_ema" in reference["metrics"][-1]
    fu.record("kill", "SIGKILLs with an EMA survived (bit-exact resume)", kills)


def test_sigkill_between_checkpoint_and_metrics_loses_no_line(tmp_path, folder, reference):
    params, run_dir = setup_run(tmp_path, folder)
    # history:1 is the startup rewrite, history:2 the one after epoch 1's checkpoints
    kills = drive(params, run_dir, tmp_path, [{"at": "history:2"}, {"at": "history:2"}], "metrics window")
    assert kills == 2
    fu.assert_same_as(reference, run_dir, "metrics window")
    fu.record("kill", "SIGKILLs between last.pt and metrics.jsonl survived", kills)


@pytest.mark.parametrize("at", ["replace:2", "replace:3"])  # before best.pt's rename; before best_hf's
def test_sigkill_around_best_checkpoint_keeps_best(tmp_path, folder, at):
    params, run_dir = setup_run(tmp_path, folder, epochs=2)
    kills = drive(params, run_dir, tmp_path, [{"at": at}], "best window")
    assert kills == 1
    best = os.path.join(run_dir, run_folder.BEST)
    assert os.path.isfile(best), f"no best.pt after a kill at {at} and a resume"
    load_model(best, torch.device("cpu"))
    load_model(os.path.join(run_dir, run_folder.HF_DIR), torch.device("cpu"))
    fu.record("kill", f"SIGKILL before a best rename ({at}) survived", kills)


def signal_then_resume(tmp_path, folder, fault, signum, report_after=False):
    """Stop the run with `signum` (from outside when fault says WAIT), check the save, then resume to the
    end; with report_after, the stop came after the last epoch: no report yet, and the resume writes it."""
    params, run_dir = setup_run(tmp_path, folder)
    marker = str(tmp_path / "marker")
    child = fu.Child(["--params", params], tmp_path, marker=marker, **fault)
    if fault["action"] == "WAIT":
        deadline = time.time() + 60
        while not os.path.exists(marker) and time.time() < deadline:
            time.sleep(0.01)
        assert os.path.exists(marker), "the run never reached the signal point"
        child.signal(signum)
        open(marker + ".ack", "w").close()
    r = child.wait()
    name = signal.Signals(signum).name
    assert r.returncode == 128 + signum, f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "--resume" in r.stdout, r.stdout[-2000:]  # it tells how to go on
    ckpt = read_training_checkpoint(os.path.join(run_dir, run_folder.LAST))
    if report_after:
        assert "stopped after the last epoch, before the end-of-run report" in r.stdout, r.stdout[-2000:]
        assert not os.path.exists(os.path.join(run_dir, "confusion.png"))
    r = fu.run(["--params", params, "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    if report_after:
        assert "which is complete" in r.stdout and os.path.exists(os.path.join(run_dir, "confusion.png")), r.stdout[-2000:]
    return run_dir, ckpt


@pytest.mark.parametrize("signum, fault, where", [
    (signal.SIGINT, {"at": f"step:{STEPS + 2}", "action": "WAIT"}, (1, 2)),  # Ctrl-C from outside, mid epoch 2
    (signal.SIGTERM, {"at": "eval:1", "action": "WAIT"}, (1, 0)),  # during epoch 1's evaluation
    (signal.SIGTERM, {"at": f"step:{2 * STEPS + 3}", "action": "TERM"}, (2, 3)),  # sent to itself, mid epoch 3
])
def test_signal_saves_exits_cleanly_and_resumes_exactly(tmp_path, folder, reference, signum, fault, where):
    run_dir, ckpt = signal_then_resume(tmp_path, folder, fault, signum)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == where, "the checkpoint is not where the signal stopped the run"
    fu.assert_same_as(reference, run_dir, signal.Signals(signum).name)
    fu.record("signals", f"{signal.Signals(signum).name} at {fault['at']} (saved, exit {128 + signum}, exact resume)", 1)


@pytest.mark.parametrize("left", ["best_hf and best_hf.old", "best_hf.old only"])
def test_best_hf_swap_killed_midway_is_repaired_by_the_next_save(tmp_path, left):
    """A kill inside save_hf's swap leaves best_hf.old beside best_hf, or alone; the next save of the
    best model must still succeed (os.replace onto a non-empty folder fails) and leave one whole folder."""
    import shutil

    from vit import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                 intermediate_size=64, image_size=16, patch_size=4, num_labels=3))
    folder = str(tmp_path / run_folder.HF_DIR)
    checkpoint.save_hf(model, folder, [0.5] * 3, [0.25] * 3)
    shutil.copytree(folder, folder + ".old")
    if left == "best_hf.old only":
        shutil.rmtree(folder)
    checkpoint.save_hf(model, folder, [0.5] * 3, [0.25] * 3)
    assert sorted(os.listdir(tmp_path)) == [run_folder.HF_DIR]
    load_model(folder, torch.device("cpu"))


# a signal after the last epoch's stop check (while the final last.pt, metrics.jsonl or curves are
# written) was announced as "saving ... then stopping", and the run then finished with exit 0 and no
# resume hint. Now the save happens (the last epoch always saves), the exit code is 128 + signal, and
# the resume it prints writes the end-of-run report.
# A fresh 3-epoch run: replace:8 is the final last.pt's rename, history:4 the final metrics rewrite.
@pytest.mark.parametrize("signum, fault", [
    (signal.SIGTERM, {"at": "replace:8", "action": "WAIT"}),  # from outside, while the final last.pt is renamed
    (signal.SIGINT, {"at": "history:4", "action": "INT"}),  # sent to itself, in the final metrics rewrite
])
def test_signal_in_the_last_epochs_tail_says_what_happened(tmp_path, folder, reference, signum, fault):
    run_dir, ckpt = signal_then_resume(tmp_path, folder, fault, signum, report_after=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (EPOCHS, 0), "the last epoch was not saved"
    fu.assert_same_as(reference, run_dir, f"{signal.Signals(signum).name} in the tail")
    fu.record("tail", f"{signal.Signals(signum).name} at {fault['at']}: saved, exit {128 + signum}, resume writes the report", 1)


# DataLoader workers (a folder read from disk): persistent workers create the loader's iterator once per
# process, and a resumed process creates it in another epoch than the uninterrupted one did. Killed at an
# epoch boundary (after epoch 1's last.pt), then stopped by SIGTERM mid-epoch 2 (saved there), then resumed
# to the end: the weights must be the uninterrupted run's, bit for bit. Each life is a fresh `python main.py`:
# DataLoader workers forked inside the fork server's children start slowly (a few images/s), fresh ones do not.
WORKERS = {"workers": 1, "in_memory": False}


def test_kill_and_signal_with_dataloader_workers_resume_bit_exact(tmp_path, folder):
    def params(name):
        return fu.write_params(tmp_path / f"{name}.json", fu.tiny_params(folder, tmp_path / name, WORKERS, epochs=2))

    r = fu.run_cli(["--params", params("reference")])
    assert r.returncode == 0 and "data workers" in r.stdout, r.stderr[-3000:]  # the DataLoader path, not the tensor loader
    reference = {"state": fu.load_state(tmp_path / "reference" / "last.pt"), "metrics": fu.read_metrics(tmp_path / "reference")}
    path, run_dir = params("run"), str(tmp_path / "run")
    r = fu.run_cli(["--params", path], at="replace:5")  # epoch 1's last.pt renamed: an epoch boundary
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert read_training_checkpoint(os.path.join(run_dir, run_folder.LAST))["epoch"] == 1
    r = fu.run_cli(["--params", path, "--resume"], at="step:2", action="TERM")  # mid epoch 2, saved
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-3000:]
    ckpt = read_training_checkpoint(os.path.join(run_dir, run_folder.LAST))
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 2)
    r = fu.run_cli(["--params", path, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    fu.assert_same_as(reference, run_dir, "workers")
    fu.record("kill", "SIGKILL at an epoch boundary with DataLoader workers (bit-exact resume)", 1)
    fu.record("signals", "SIGTERM mid-epoch with DataLoader workers (saved, exit 143, exact resume)", 1)
