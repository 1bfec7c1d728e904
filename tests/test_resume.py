"""Resume is exact: a run interrupted (by a real SIGINT, mid-epoch or at an epoch's end) and resumed
ends with bit-identical weights, EMA weights, optimizer state and metrics.jsonl to an uninterrupted
run, even when metrics.jsonl was left a line long or short."""

import json
import os
import signal

import pytest
import torch

from helpers import make_folder, run_main, tiny_params
from vit import cli, evaluation
from vit.loading.project import read_training_checkpoint
from vit.train import engine

# dropout, drop path and mixup all draw random numbers: resume must restore or re-derive every stream;
# the EMA's warm-up depends on the step count, and its weights pick best.pt
NOISY = dict(epochs=3, mixup=0.4, cutmix=0.4, drop_path=0.2, grad_accum=2, layer_decay=0.9, ema_decay=0.99)
SETS = ["--set", "model.hidden_dropout_prob=0.1", "output.best_metric=val_acc_ema"]


def sigint_on_call(monkeypatch, module, name, n):
    """Make module.name send us SIGINT (like a Ctrl-C) on its n-th call, then carry on."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, wrapper)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("ref")
    make_folder(tmp / "images", classes=3, per_class=10)
    torch.set_num_threads(1)
    assert cli.main(["--params", tiny_params(tmp, tmp / "images", **NOISY), *SETS]) == 0
    return tmp / "run"


def assert_same_run(a, b):
    ca, cb = read_training_checkpoint(str(a / "last.pt")), read_training_checkpoint(str(b / "last.pt"))
    for weights in ("model", "model_ema"):
        assert ca[weights].keys() == cb[weights].keys()
        for k in ca[weights]:
            assert torch.equal(ca[weights][k], cb[weights][k]), f"{weights} {k} differs by {(ca[weights][k] - cb[weights][k]).abs().max()}"
    assert not torch.equal(ca["model"]["classifier.weight"], ca["model_ema"]["classifier.weight"])  # a real average
    for s in ca["optimizer"]["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ca["optimizer"]["state"][s][k], cb["optimizer"]["state"][s][k])
    assert ca["scheduler"] == cb["scheduler"] and ca["epoch"] == cb["epoch"] == 3
    ha = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hb] == [1, 2, 3]  # no duplicate, no gap
    for x, y in zip(ha, hb):
        for k in ("loss", "acc", "val_loss", "val_acc", "val_loss_ema", "val_acc_ema", "lr"):
            assert x[k] == y[k], (k, x, y)


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_interrupted_and_resumed_equals_uninterrupted(reference, where, tmp_path, capsys, monkeypatch):
    make_folder(tmp_path / "images", classes=3, per_class=10)
    argv = ["--params", tiny_params(tmp_path, tmp_path / "images", **NOISY), *SETS]
    with monkeypatch.context() as m:
        if where == "mid_epoch":  # 3 batches an epoch: the 5th loss is epoch 2's second batch, which ends a step
            sigint_on_call(m, engine, "loss_fn", 5)
        else:  # during epoch 2's evaluation (two an epoch: the weights, then their EMA): the loop finishes the epoch, saves, and stops
            sigint_on_call(m, evaluation, "evaluate", 3)
        code, out, err = run_main(argv, capsys)
    assert code == 128 + signal.SIGINT, err
    assert "python main.py --params" in out and "--resume" in out and "SIGINT" in err
    ckpt = read_training_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == ((1, 1) if where == "mid_epoch" else (2, 0))
    # what a kill between the checkpoint and the log could leave: a line too many, or one too few
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines + lines[-1:] if where == "mid_epoch" else lines[:-1]))
    code, out, err = run_main(argv + ["--resume"], capsys)
    assert code == 0, err
    assert "resuming" in out
    assert_same_run(reference, tmp_path / "run")
