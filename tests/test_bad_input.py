"""Bad input never costs a finished epoch: broken files are counted, an empty class is refused,
a non-finite loss stops with the last good checkpoint intact, out-of-memory and a full disk say
what to do."""

import errno
import hashlib
import os
import re
import types

import pytest
import torch

from helpers import make_folder, run_main, tiny_params
from vit.errors import UserError
from vit.loading.project import read_training_checkpoint
from vit import distributed, evaluation
from vit.train import checkpoint, engine


def test_broken_files_are_skipped_and_counted(tmp_path, capsys):
    make_folder(tmp_path / "images", classes=3, per_class=10)
    bad = tmp_path / "images" / "class_0"
    (bad / "zero.png").write_bytes(b"")
    (bad / "random.jpg").write_bytes(os.urandom(2000))
    (bad / "text.png").write_text("not an image at all")
    good = (bad / "0.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "images" / "class_1" / "notes.txt").write_text("readme")
    code, out, err = run_main(["--params", tiny_params(tmp_path, tmp_path / "images", epochs=1)], capsys)
    assert code == 0, err
    assert "Epoch : 1" in out and os.path.isfile(tmp_path / "run" / "best.pt")
    counts = out[out.index("bad files:"):]
    skipped, dropped = (int(s) for s in re.findall(r"(\d+) (?:skipped|dropped)", counts)[:2])
    assert skipped + dropped >= 4, out  # zero-byte, random bytes, text-as-png, truncated (the .txt may be ignored)


def test_empty_class_folder_is_refused_by_name(tmp_path, capsys):
    make_folder(tmp_path / "images", classes=3, per_class=6)
    os.makedirs(tmp_path / "images" / "empty_class")
    code, out, err = run_main(["--params", tiny_params(tmp_path, tmp_path / "images", epochs=1)], capsys)
    assert code == 2 and "empty_class" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    make_folder(tmp_path / "images", classes=3, per_class=10)
    real, calls = engine.loss_fn, []

    def loss_fn(*args):  # epoch 1 is fine (3 batches); epoch 2's second batch goes NaN
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(engine, "loss_fn", loss_fn)
    last = tmp_path / "run" / "last.pt"
    saved = []  # sha256 of each last.pt written
    real_save = checkpoint.save

    def save(path, payload):
        real_save(path, payload)
        if path.endswith("last.pt"):
            saved.append(hashlib.sha256(open(path, "rb").read()).hexdigest())

    monkeypatch.setattr(checkpoint, "save", save)
    code, out, err = run_main(["--params", tiny_params(tmp_path, tmp_path / "images", epochs=3)], capsys)
    assert code == 2 and "nan" in err and "epoch 2" in err and "intact" in err and "--resume" in err
    assert "Traceback" not in err
    assert len(saved) == 1 and hashlib.sha256(last.read_bytes()).hexdigest() == saved[0]  # epoch 1's, untouched
    assert read_training_checkpoint(str(last))["epoch"] == 1
    assert len(open(tmp_path / "run" / "metrics.jsonl").read().splitlines()) == 1


def trainer(model, optimizer, train):
    """An engine.Trainer for `model` at a constant lr of 1e-3, fp32, one process."""
    return engine.Trainer(model, optimizer, torch.amp.GradScaler("cuda", enabled=False), lambda s: 1e-3,
                          engine.StepSettings.from_params(train, train["precision"]), distributed.Dist())


class _Linear(torch.nn.Module):
    """A classifier small enough to run 25 steps in no time; returns an object with `.logits` like ours."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x):
        return types.SimpleNamespace(logits=self.fc(x.flatten(1)))


def test_nan_between_syncs_stops_at_the_next_sync_and_names_its_first_batch(monkeypatch):
    real, calls, consumed = engine.loss_fn, [], []

    def loss_fn(*args):  # batch 3 goes NaN; later ones are whatever NaN weights give
        calls.append(1)
        return real(*args) * float("nan") if len(calls) == 3 else real(*args)

    monkeypatch.setattr(engine, "loss_fn", loss_fn)
    model = _Linear()
    opt = torch.optim.AdamW([{"params": list(model.parameters()), "lr_scale": 1.0}])
    train = {"batch_size": 4, "grad_accum": 1, "precision": "fp32", "label_smoothing": 0.0, "clip_grad": 1.0}
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])) for _ in range(25)]

    class Loader:  # len() for the bar, and a record of how far the loop read
        def __len__(self):
            return len(batches)

        def __iter__(self):
            for k, b in enumerate(batches):
                consumed.append(k)
                yield b

    with pytest.raises(engine.NonFiniteLoss, match=r"became nan at epoch 1, batch 3/25 \(lr 0.001\)"):
        engine.train_one_epoch(trainer(model, opt, train), Loader(), engine.Epoch(0))
    assert len(consumed) == engine.SYNC_EVERY + 1  # caught at the first sync after it (batch index 10)


class _OOMModel(torch.nn.Module):
    """Stands in for a model too big for the GPU."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_suggests_smaller_batch_or_accumulation():
    model = _OOMModel()
    opt = torch.optim.AdamW([{"params": [model.w], "lr_scale": 1.0}])
    train = {"batch_size": 128, "grad_accum": 1, "precision": "fp32", "label_smoothing": 0.0, "clip_grad": None}
    loader = [(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(UserError) as e:
        engine.train_one_epoch(trainer(model, opt, train), loader, engine.Epoch(0))
    msg = str(e.value)
    assert "out of memory" in msg and "train.batch_size=64" in msg and "train.grad_accum" in msg
    with pytest.raises(UserError, match="out of memory; pass a smaller --batch-size than 2"):
        evaluation.evaluate(model, loader, num_classes=3, d=distributed.Dist(),
                            oom_advice="pass a smaller --batch-size than 2.")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoint.save(path, {"epoch": 1, "w": torch.ones(3)})
    before = open(path, "rb").read()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError) as e:
        checkpoint.save(path, {"epoch": 2, "w": torch.zeros(3)})
    assert "No space left on device" in str(e.value) and "previous" in str(e.value) and "kept" in str(e.value)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["last.pt"]  # no temp file left


def test_disk_full_while_swapping_the_hf_folder_keeps_the_previous_one(tmp_path, monkeypatch):
    from vit import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=16, patch_size=4, num_labels=3))
    directory = str(tmp_path / "best_hf")
    checkpoint.save_hf(model, directory, [0.5] * 3, [0.5] * 3)
    before = open(os.path.join(directory, "model.safetensors"), "rb").read()
    real_replace = os.replace

    def full(src, dst):  # the new folder's rename fails, after the previous one was moved aside
        if src.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    with pytest.raises(UserError) as e:
        checkpoint.save_hf(model, directory, [0.5] * 3, [0.5] * 3)
    assert "No space left on device" in str(e.value) and "previous" in str(e.value) and "kept intact" in str(e.value)
    assert open(os.path.join(directory, "model.safetensors"), "rb").read() == before
    assert os.listdir(tmp_path) == ["best_hf"]  # no .tmp or .old folder left


def test_unsafe_or_corrupt_checkpoints_are_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil(), "config": {}}))
    with pytest.raises(UserError, match="could run code"):
        read_training_checkpoint(str(evil))
    assert not os.path.exists(tmp_path / "pwned")
    good = tmp_path / "good.pt"
    checkpoint.save(str(good), {"model": {}, "config": {}})
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserError, match="cut.pt"):
        read_training_checkpoint(str(tmp_path / "cut.pt"))
