"""Runs side by side: TensorBoard event files (read back with TensorBoard's own reader), a resume that
writes no step twice, `vit runs` over two runs that differ in lr and over broken folders, and
`eval --out`.

Two tiny runs of 2 epochs with an EMA of the weights: lr_a uninterrupted; lr_b killed before its first
checkpoint, started again, killed in epoch 2 after that epoch's events were written but before its
checkpoint, then resumed.
"""

import csv
import importlib.util
import json
import os
import re
import shutil
import sys

import pytest
import torch

import faults_util as fu
from helpers import make_folder, run_main
from vit import runs as R
from vit.train import tensorboard

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason='the tensorboard package is not installed (pip install ".[tensorboard]")')
# 60 images of 6 classes (top-5 needs more than 5), split per class: 48 train images, batch 4, so 12 steps
# an epoch, logged at batches 0 and 10 (engine.SYNC_EVERY); 12 val images
TRAIN = dict(epochs=2, batch_size=4, ema_decay=0.99)
STEPS = 12
PER_STEP = ("train/loss", "train/acc", "train/lr")
PER_EPOCH = ("val/loss", "val/acc", "val/top5", "val/loss_ema", "val/acc_ema", "val/top5_ema", "train/epoch_loss",
             "train/epoch_acc", "speed/images_per_s", "speed/epoch_s")


def params_file(tmp, folder, name, **train):
    p = fu.tiny_params(folder, tmp / "runs" / name, **{**TRAIN, **train})
    p["output"]["tensorboard"] = "auto"
    return fu.write_params(tmp / f"{name}.json", p)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("side_by_side")
    make_folder(tmp / "images", classes=6, per_class=10)
    r = fu.run(["--params", params_file(tmp, tmp / "images", "lr_a")], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    b = params_file(tmp, tmp / "images", "lr_b", lr=1e-3)
    # torch.save 1 is epoch 1's best.pt: no last.pt yet, so the next launch starts afresh in the same folder
    assert fu.run(["--params", b], tmp, at="save:1").returncode == -9
    # torch.save 3 is epoch 2's first: its events are written, its checkpoint is not
    assert fu.run(["--params", b], tmp, at="save:3").returncode == -9
    shutil.copytree(tmp / "runs" / "lr_b", tmp / "killed_b")
    r = fu.run(["--params", b, "--resume"], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def events(folder):
    """{tag: [(step, value), ...]} of a run folder's scalars and texts, as TensorBoard's reader gives them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out.update({tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]})
    return out


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@needs_tensorboard
def test_the_event_files_hold_each_curve_and_the_params(two_runs):
    run = two_runs / "runs" / "lr_a"
    got = events(run)
    assert set(PER_STEP + PER_EPOCH) <= set(got), sorted(got)
    for tag in PER_STEP:  # the optimizer steps done at batches 0 and 10 of each epoch
        assert [s for s, _ in got[tag]] == [1, 11, STEPS + 1, STEPS + 11], (tag, got[tag])
    for tag in PER_EPOCH:  # at the step that ends each epoch
        assert [s for s, _ in got[tag]] == [STEPS, 2 * STEPS], (tag, got[tag])
    for record in metrics(run):
        step = record["epoch"] * STEPS
        for key, tag in tensorboard.EPOCH_TAGS.items():
            assert dict(got[tag])[step] == pytest.approx(record[key], rel=1e-6), (tag, record)
    lrs = [lr for _, lr in got["train/lr"]]
    assert lrs[0] < lrs[1] and max(lrs) == pytest.approx(3e-3, rel=0.1)  # the warm-up (float32 in the file)
    assert all(0 <= a <= 1 for _, a in got["train/acc"]) and all(0 < loss < 5 for _, loss in got["train/loss"])
    (step, text), = got["params/text_summary"]
    assert step == 0 and '"lr": 0.003' in text and str(run) in text


@needs_tensorboard
def test_a_resume_writes_no_step_twice(two_runs):
    """The killed launch's events of epoch 2 were on disk (its checkpoint was not): the resume purges
    them and writes them again; the launch before the first checkpoint left nothing behind."""
    killed = events(two_runs / "killed_b")
    assert [s for s, _ in killed["val/acc"]] == [STEPS, 2 * STEPS]  # the case to survive: events ahead of last.pt
    run = two_runs / "runs" / "lr_b"
    # the second launch removed the first one's file, which no checkpoint covered
    assert len([f for f in os.listdir(run) if f.startswith("events.out.tfevents.")]) == 2
    got, reference = events(run), events(two_runs / "runs" / "lr_a")
    for tag, points in got.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: steps written twice: {steps}"
        if tag != "params/text_summary":
            assert steps == [s for s, _ in reference[tag]], (tag, steps)
    assert [s for s, _ in got["params/text_summary"]] == [0]
    for record in metrics(run):
        assert dict(got["val/acc"])[record["epoch"] * STEPS] == pytest.approx(record["val_acc"], rel=1e-6)


def test_tensorboard_true_without_the_package_is_one_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as where it is not installed
    assert not tensorboard.wanted("auto") and not tensorboard.wanted(False)
    make_folder(tmp_path / "images", classes=2, per_class=4)
    p = fu.tiny_params(tmp_path / "images", tmp_path / "run", epochs=1)
    p["output"]["tensorboard"] = True
    code, out, err = run_main(["--params", fu.write_params(tmp_path / "p.json", p)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "output.tensorboard is true" in err and 'pip install ".[tensorboard]"' in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def broken_folders(root):
    """Folders that are not runs, or runs whose files cannot be read: (name, words its row must show)."""
    cases = []

    def case(name, words, **files):
        os.makedirs(root / name)
        for file, content in files.items():
            path = root / name / file.replace("_", ".")
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        cases.append((name, words))

    case("empty", "not a run")
    case("garbage", "metrics.jsonl line 2 is not valid JSON", metrics_jsonl='{"epoch": 1}\n{"epoch": 2, \n')
    case("deep", "params.json is not valid JSON", params_json="[" * 100_000)
    case("nested", "params.json holds train.lr nested", params_json='{"train": {"lr": [[0.1]]}}')
    case("not_ours", "last.pt cannot be read", last_pt=os.urandom(4096))
    case("records", "metrics.jsonl line 1 is not an epoch's record", metrics_jsonl='[1, 2]\n')
    case("binary", "params.json is not UTF-8", params_json=b"\xff\xfe{}")
    os.makedirs(root / "device")
    os.symlink("/dev/zero", root / "device" / "last.pt")
    cases.append(("device", "last.pt is a character device"))
    os.makedirs(root / "huge")
    with open(root / "huge" / "metrics.jsonl", "wb") as f:
        f.truncate(R.MAX_METRICS_BYTES + 1)  # sparse: costs no disk
    cases.append(("huge", "metrics.jsonl is larger than 32 MiB"))
    case("many", "metrics.jsonl holds more than 100,000 records", metrics_jsonl='{"epoch": 1}\n' * (R.MAX_RECORDS + 1))
    os.makedirs(root / "folder_named_params" / "params.json")
    cases.append(("folder_named_params", "params.json is not a file"))
    return cases


def test_vit_runs_lists_two_runs_names_the_difference_and_survives_broken_folders(two_runs, capsys):
    root = two_runs / "runs"
    cases = broken_folders(root)
    shutil.copytree(root / "lr_a", root / "halfway")  # its last.pt one epoch in: resumable
    ckpt = torch.load(root / "halfway" / "last.pt", weights_only=True)
    ckpt["epoch"] = 1
    torch.save(ckpt, root / "halfway" / "last.pt")
    shutil.copytree(root / "lr_a", root / "no_last")  # no checkpoint: stopped
    os.remove(root / "no_last" / "last.pt")

    code, out, err = run_main(["runs", str(root), "--csv", str(two_runs / "runs.csv")], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["run", "epochs"]
    rows = {line.split()[0]: line for line in lines[1:] if line.split() and line.split()[0] in os.listdir(root)}
    assert set(rows) == set(os.listdir(root)), out
    for name in ("lr_a", "lr_b"):
        assert re.search(rf"^{name}\s+2/2\s+\d\.\d{{4}}\s+[12]\s+\d+ s\s+complete\s+", rows[name]), rows[name]
    # what differs: lr, and nothing else (output.dir aside); under the table its values in row order:
    # halfway, lr_a, lr_b, no_last (the broken folders have no params to show)
    assert "train.lr 0.003" in rows["lr_a"] and "train.lr 0.001" in rows["lr_b"]
    assert out.endswith("\ntrain.lr 0.003 → 0.003 → 0.001 → 0.003\nwrote " + str(two_runs / "runs.csv") + "\n"), out
    assert "resumable" in rows["halfway"] and "1/2" in rows["halfway"]
    assert "stopped" in rows["no_last"] and "no last.pt" in rows["no_last"]
    for name, words in cases:
        assert words in rows[name], rows[name]
        assert (" not a run " if name == "empty" else " broken ") in rows[name]
    with open(two_runs / "runs.csv") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert table["lr_a"]["train.lr"] == "0.003" and table["lr_b"]["train.lr"] == "0.001"
    assert table["lr_b"]["state"] == "complete" and table["lr_b"]["epochs_done"] == "2"
    assert float(table["lr_a"]["best"]) == max(h["val_acc"] for h in metrics(root / "lr_a"))


def test_vit_runs_with_two_runs_names_only_lr(two_runs, capsys):
    """Given as run folders themselves: the only difference named is train.lr."""
    runs = [str(two_runs / "runs" / n) for n in ("lr_a", "lr_b")]
    code, out, _ = run_main(["runs", *runs, str(two_runs / "missing")], capsys)
    assert code == 0
    assert out.splitlines()[-1] == "train.lr 0.003 → 0.001", out
    assert re.search(r"^missing\s+not a run\s+no such folder$", out, re.M), out


def test_planned_epochs_come_from_the_checkpoints_plan_else_params():
    assert R.planned_epochs({"plan": {"epochs": 7}}, {"train.epochs": 20}) == 7  # a time budget's decision
    assert R.planned_epochs({"epoch": 3}, {"train.epochs": 20}) == 20
    assert R.planned_epochs({"plan": "junk"}, None) is None
    assert R.planned_epochs(None, {"train.epochs": True}) is None


def test_eval_out_writes_the_metrics_per_class_accuracy_and_confusion_as_json(two_runs, capsys):
    run, out = two_runs / "runs" / "lr_a", two_runs / "results" / "eval.json"
    out.parent.mkdir(exist_ok=True)  # --out names a file in an existing folder, as for every command
    code, printed, err = run_main(["eval", "--checkpoint", str(run), "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    acc = float(re.search(r"acc: (\d\.\d+)", printed).group(1))
    assert result["metrics"]["acc"] == pytest.approx(acc, abs=5e-5) and {"loss", "top5", "images_per_s"} <= set(result["metrics"])
    assert result["checkpoint"] == str(run / "best.pt") and result["ema"] is False
    assert result["data"]["images"] == 12 and result["data"]["train_dir"] == str(two_runs / "images")
    classes = result["classes"]
    assert classes == [f"class_{i}" for i in range(6)] and list(result["per_class_accuracy"]) == classes
    matrix = result["confusion"]
    assert len(matrix) == 6 and all(len(row) == 6 for row in matrix) and sum(map(sum, matrix)) == 12
    assert sum(matrix[i][i] for i in range(6)) / 12 == pytest.approx(result["metrics"]["acc"])
    assert f"wrote {out}" in printed


@needs_tensorboard
def test_a_full_disk_under_the_event_writer_is_one_sentence_and_no_traceback(tmp_path, monkeypatch):
    """The event file is written by SummaryWriter's own thread: its error comes back at the next call in
    the run, as one sentence, and the thread's traceback is not printed."""
    import errno
    import threading

    from tensorboard.compat.tensorflow_stub.io import gfile
    from vit.errors import UserError

    printed = []  # what would reach the default hook: a "Traceback ..." on stderr
    monkeypatch.setattr(threading, "excepthook", printed.append)
    board = tensorboard.Board(str(tmp_path), {"train": {"lr": 0.1}}, resumed_step=None)

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)
    with pytest.raises(UserError, match=r"could not write .*events\.out\.tfevents\.\* \(No space left on device\); "
                                        r"no checkpoint was saved yet"):
        board.steps(None)(1, {"loss": 1.0, "correct": 1.0, "count": 2.0}, 0.1)
        board.epoch(1, {"val_acc": 0.5})
    board.close(failed=True)  # the run's own error is the one told
    assert threading.excepthook == printed.append and not printed, printed
