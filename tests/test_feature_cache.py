"""train.cache_features: the head of a linear probe trains over features extracted once. With augmentation
off it learns what the uncached probe learns, resume reads the cache back and stays exact, and what
cannot work is refused in one sentence."""

import json
import signal

import pytest
import torch

from helpers import make_folder, run_main, tiny_params
from vit.loading.project import read_training_checkpoint
from vit.train import engine, feature_cache

PROBE = dict(epochs=3, freeze_backbone=True, random_resized_crop_scale=[1, 1], hflip=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe") / "images"
    make_folder(folder, classes=3, per_class=12)
    return folder


def history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return read_training_checkpoint(str(run / "last.pt"))["model"]


@pytest.mark.parametrize("in_memory", [True, False])  # the tensor loader, and the workers' file loader
def test_the_cached_probe_learns_what_the_uncached_one_learns(images, tmp_path, capsys, in_memory):
    runs = {}
    for cache in (False, True):
        folder = tmp_path / str(cache)
        folder.mkdir()
        code, out, err = run_main(["--params", tiny_params(folder, images, cache_features=cache, **PROBE),
                                   "--set", f"data.in_memory={json.dumps(in_memory)}"], capsys)
        assert code == 0, err
        runs[cache] = folder / "run"
    assert "feature cache: 27 train + 9 val images extracted in fp32" in out and "features.safetensors" in out
    assert "feature cache: each epoch trains the head alone, over the cached features" in out  # under the cost line
    uncached, cached = history(runs[False]), history(runs[True])
    assert [h["val_acc"] for h in cached] == [h["val_acc"] for h in uncached]
    for h, g in zip(cached, uncached):
        assert h["loss"] == pytest.approx(g["loss"], abs=1e-6) and h["val_loss"] == pytest.approx(g["val_loss"], abs=1e-6)
    a, b = weights(runs[False]), weights(runs[True])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (runs[True] / "misclassified.png").exists() and (runs[True] / "confusion.png").exists()  # the report ran on images


def test_resume_reads_the_cache_back_and_ends_where_the_uninterrupted_run_does(images, tmp_path, capsys, monkeypatch):
    ref = tmp_path / "ref"
    ref.mkdir()
    assert run_main(["--params", tiny_params(ref, images, cache_features=True, **PROBE)], capsys)[0] == 0
    argv = ["--params", tiny_params(tmp_path, images, cache_features=True, **PROBE)]
    with monkeypatch.context() as m:  # Ctrl-C in the middle of epoch 2 (3 batches an epoch)
        real, calls = engine.loss_fn, []

        def loss_fn(*a, **kw):
            calls.append(1)
            if len(calls) == 5:
                signal.raise_signal(signal.SIGINT)
            return real(*a, **kw)

        m.setattr(engine, "loss_fn", loss_fn)
        code, _, _ = run_main(argv, capsys)
    assert code == 128 + signal.SIGINT
    with monkeypatch.context() as m:
        m.setattr(feature_cache, "extract", lambda *a, **kw: pytest.fail("resume extracted the features again"))
        code, out, err = run_main(argv + ["--resume"], capsys)
    assert code == 0, err
    assert "read back from" in out and "extraction skipped" in out
    a, b = weights(ref / "run"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_acc"] for h in history(ref / "run")] == [h["val_acc"] for h in history(tmp_path / "run")]


def test_a_cache_made_from_other_data_is_replaced(images, tmp_path, capsys):
    argv = ["--params", tiny_params(tmp_path, images, cache_features=True, **dict(PROBE, epochs=1))]
    assert run_main(argv, capsys)[0] == 0
    (tmp_path / "run" / "last.pt").unlink()  # a new run in the same folder, on other data
    code, out, err = run_main(argv + ["--set", "data.std=[0.3, 0.3, 0.3]"], capsys)
    assert code == 0, err
    assert "extracted in fp32" in out and "replacing the one there, made from another backbone, data or precision" in out


@pytest.mark.parametrize("sets, words", [
    (["train.freeze_backbone=false"], "train.cache_features is true but train.freeze_backbone is false"),
    (["train.hflip=0.5"], "caches one view of each image, so augmentation cannot apply (train.hflip=0.5); set train.hflip=0.0"),
    (["train.random_resized_crop_scale=[0.8, 1]", "train.mixup=0.2"],
     "(train.random_resized_crop_scale=[0.8, 1], train.mixup=0.2); set train.random_resized_crop_scale=[1.0, 1.0], train.mixup=0.0"),
    (["train.strategy=\"fsdp\""], "train.cache_features is true but train.strategy is \"fsdp\", and the cached probe trains the head alone"),
    (["data.dataset=\"webdataset\"", "data.train_shards=[\"train-000000.tar\"]"],
     "train.cache_features is true but data.dataset is \"webdataset\", and streamed shards cannot be read in index order"),
])
def test_what_the_cache_cannot_serve_is_refused_in_one_sentence(images, tmp_path, capsys, sets, words):
    code, out, err = run_main(["--params", tiny_params(tmp_path, images, cache_features=True, **PROBE), "--set", *sets], capsys)
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_a_cache_past_its_limit_is_refused_before_anything_is_extracted(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(feature_cache, "LIMIT_BYTES", 1024)
    monkeypatch.setattr(feature_cache, "extract", lambda *a, **kw: pytest.fail("extracted past the limit"))
    code, out, err = run_main(["--params", tiny_params(tmp_path, images, cache_features=True, **PROBE)], capsys)
    assert code == 2 and "would hold 36 images x 32 floats (4.5 KiB), above the cache's limit of 1.0 KiB" in err, err
    assert not (tmp_path / "run" / "features.safetensors").exists()
