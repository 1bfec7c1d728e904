"""data.dataset "webdataset" and `vit shards`: shards written from a folder train; two ranks under torchrun
split them with no sample twice and only the stated remainder left out; bad samples and damaged tars
are skipped and counted with every rank keeping its step count; mistakes are one sentence; a run
stopped mid-epoch resumes (replaying that epoch's first steps' reading) to the uninterrupted run's
weights, bit for bit."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
import webdataset as wds

import faults_util as fu
from helpers import ROOT, make_folder, run_main, section
from vit import data
from vit.data.shards import INDEX
from vit.errors import UserError

IDS = 40  # the counting test's samples: one image per class, so a label is a sample's id


def shards_of(folder, out, per_shard, capsys):
    code, stdout, err = run_main(["shards", str(folder), "--out", str(out), "--per-shard", str(per_shard)], capsys)
    assert code == 0, err
    return stdout


def shard_params(out, n_train, n_val=None, **data_keys):
    """params' data section for shards written to `out` (16x16 RGB, like helpers.tiny_params)."""
    pattern = f"{out}/train-{{000000..{n_train - 1:06d}}}.tar"
    val = f"{out}/val-{{000000..{n_val - 1:06d}}}.tar" if n_val else None
    keys = dict(dataset="webdataset", train_shards=pattern, val_shards=val, image_size=16, channels=3,
                mean=[0.5] * 3, std=[0.25] * 3, workers=0)
    return section("data", **{**keys, **data_keys})


def test_shards_command_writes_both_splits_skips_bad_files_and_prints_the_params(tmp_path, capsys):
    make_folder(tmp_path / "src" / "train", classes=3, per_class=6)
    make_folder(tmp_path / "src" / "val", classes=3, per_class=2, seed=1)
    (tmp_path / "src" / "train" / "class_1" / "broken.png").write_bytes(b"not a png")
    out = shards_of(tmp_path / "src", tmp_path / "shards", 4, capsys)
    files = sorted(os.listdir(tmp_path / "shards"))
    assert files == [INDEX, *[f"train-{i:06d}.tar" for i in range(5)], "val-000000.tar", "val-000001.tar"], files
    index = json.loads((tmp_path / "shards" / INDEX).read_text())
    assert index["classes"] == ["class_0", "class_1", "class_2"]
    assert sum(v for k, v in index["samples"].items() if k.startswith("train")) == 18  # the broken file skipped
    assert "skipped 1 file(s)" in out and "data.train_shards=" in out and '"train_samples": 18' in out
    members = tarfile.open(tmp_path / "shards" / "train-000000.tar").getnames()
    assert members[:2] == ["train000000000.cls", "train000000000.png"]  # webdataset's layout: key.ext


def test_a_run_trains_on_shards(tmp_path, capsys):
    make_folder(tmp_path / "src" / "train", classes=3, per_class=8)
    make_folder(tmp_path / "src" / "val", classes=3, per_class=2, seed=1)
    shards_of(tmp_path / "src", tmp_path / "shards", 5, capsys)
    params = {"model": {"patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64},
              "data": shard_params(tmp_path / "shards", 5, 2),
              "train": {"epochs": 2, "batch_size": 4, "lr": 3e-3, "warmup_epochs": 1, "precision": "fp32"},
              "output": {"dir": str(tmp_path / "run"), "misclassified": 4}}
    path = fu.write_params(tmp_path / "params.json", params)
    code, out, err = run_main(["--params", path], capsys)
    assert code == 0, err
    assert "data webdataset" in out and "data: 24 train images, 6 val images" in out
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["val_acc"] >= 0.5
    code, out, err = run_main(["eval", "--checkpoint", str(tmp_path / "run")], capsys)  # vit eval reads the val shards
    assert code == 0 and "the run's data.val_shards" in out and "(6 images)" in out, out + err


COUNT_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
from vit import data
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
d, t = json.load(open({params!r}))
loaders = data.build_loaders(d, t, "cpu", rank, world)
seen = []
for epoch in range(2):
    loaders.train.set_epoch(epoch)
    seen.append([y for _, ys in loaders.train for y in ys.tolist()])
json.dump({{"seen": seen, "len": len(loaders.train), "samples": loaders.train.samples}}, open({out!r} + str(rank), "w"))
"""


def test_two_ranks_split_the_shards_with_nothing_seen_twice_and_only_the_stated_remainder_lost(tmp_path, capsys):
    make_folder(tmp_path / "ids", classes=IDS, per_class=1)
    shards_of(tmp_path / "ids", tmp_path / "shards", 5, capsys)  # 8 shards of 5: 4 per rank, 2 per worker
    d = shard_params(tmp_path / "shards", 8, workers=2)
    t = section("train", batch_size=4, seed=3)
    (tmp_path / "p.json").write_text(json.dumps([d, t]))
    script = tmp_path / "count.py"
    script.write_text(COUNT_SCRIPT.format(root=ROOT, params=str(tmp_path / "p.json"), out=str(tmp_path / "seen")))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"seen{rank}").read_text()) for rank in (0, 1)]
    steps = ranks[0]["len"]
    # a worker's share is 10 samples: 2 full batches of 4; a rank's 4 batches; 2 x 16 of the 40 seen each epoch
    assert steps == ranks[1]["len"] == 4
    stated = ranks[0]["samples"] - steps * 4 * 2  # what the start-up line says drop_last leaves out per epoch
    assert stated == 8
    for epoch in range(2):
        both = ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]
        assert len(ranks[0]["seen"][epoch]) == len(ranks[1]["seen"][epoch]) == steps * 4  # the same steps on each rank
        assert len(both) == len(set(both)), f"epoch {epoch}: a sample seen twice"
        assert IDS - len(set(both)) == stated, f"epoch {epoch}: {IDS - len(set(both))} lost, {stated} stated"
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1], "the order is shuffled anew each epoch"


def write_tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def png(colour):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, "PNG")
    return buf.getvalue()


def test_bad_samples_and_a_truncated_tar_are_skipped_and_counted_and_every_step_still_comes(tmp_path):
    good = [{"__key__": f"g{i}", "png": png((200, 10 * i, 0)), "cls": str(i % 2).encode()} for i in range(6)]
    write_tar(tmp_path / "train-000000.tar", good[:3] + [{"__key__": "corrupt", "png": b"\x89PNG broken", "cls": b"0"},
                                                         {"__key__": "unknown", "png": png((0, 0, 0)), "cls": b"7"},
                                                         {"__key__": "nocls", "png": png((0, 0, 0))}])
    write_tar(tmp_path / "train-000001.tar", good[3:] * 2)
    whole = (tmp_path / "train-000001.tar").read_bytes()
    (tmp_path / "train-000001.tar").write_bytes(whole[:len(whole) // 2 + 100])  # truncated mid-member
    (tmp_path / INDEX).write_text(json.dumps({"classes": ["a", "b"], "samples": {"train-000000.tar": 6, "train-000001.tar": 6}}))
    loaders = data.build_loaders(shard_params(tmp_path, 2), section("train", batch_size=2), "cpu")
    with fu.deadline(60):
        batches = list(loaders.train)
    assert len(batches) == len(loaders.train) == 6 and all(len(y) == 2 for _, y in batches)  # damage made up by replay
    report = loaders.report
    assert loaders.train.skipped >= 4 and report["dropped_at_load"] >= 4
    reasons = " ".join(report["dropped_files"])
    for words in ("corrupt", "class 7 is not one of the 2 classes", "no class number", "train-000001.tar: damaged tar"):
        assert words in reasons, (words, reasons)


@pytest.mark.parametrize("change, words", [
    ({"train_shards": []}, "data.train_shards is empty"),
    ({"train_shards": "{d}/nothing-{{000000..000003}}.tar"}, "not files"),
    ({"train_shards": None}, "data.train_shards is empty"),
    ({"train_shards": "{e}/other.tar"}, "shards.json cannot be read"),
])
def test_shard_mistakes_are_one_sentence(tmp_path, capsys, change, words):
    make_folder(tmp_path / "src", classes=2, per_class=3)
    shards_of(tmp_path / "src", tmp_path / "shards", 3, capsys)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "other.tar").write_bytes((tmp_path / "shards" / "train-000000.tar").read_bytes())
    d = {k: (v.format(d=tmp_path / "shards", e=tmp_path / "elsewhere") if isinstance(v, str) else v) for k, v in change.items()}
    params = {"model": {"patch_size": 4, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64},
              "data": {**shard_params(tmp_path / "shards", 2), **d}, "output": {"dir": str(tmp_path / "run")}}
    path = fu.write_params(tmp_path / "params.json", params)
    with fu.deadline(60):
        code, _, err = run_main(["--params", path], capsys)
    assert code == 2 and err.count("error: ") == 1 and words in err, err


def test_a_run_on_shards_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, capsys):
    make_folder(tmp_path / "src", classes=3, per_class=10)
    shards_of(tmp_path / "src", tmp_path / "shards", 4, capsys)
    runs = {}
    for name in ("whole", "stopped"):  # 30 samples in 8 shards, batch 4: 7 steps per epoch
        params = fu.tiny_params(tmp_path / "src", tmp_path / name, epochs=2, batch_size=4)
        params["data"] = shard_params(tmp_path / "shards", 8)  # no worker processes: a forked child would start them slowly
        path = fu.write_params(tmp_path / f"{name}.json", params)
        if name == "stopped":
            # SIGTERM at step 10, 3 steps into epoch 2: saved there, so the resumed epoch 2 replays its first 3 steps' data
            stopped = fu.run(["--params", path], tmp_path, at="step:10", action="TERM")
            assert stopped.returncode == 143 and torch.load(tmp_path / name / "last.pt", weights_only=True)["step_in_epoch"] == 3
            r = fu.run(["--params", path, "--resume"], tmp_path)
        else:
            r = fu.run(["--params", path], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)
    for key, value in runs["whole"]["model"].items():
        assert torch.equal(runs["stopped"]["model"][key], value), key
    assert runs["stopped"]["history"][-1]["loss"] == runs["whole"]["history"][-1]["loss"]


def test_a_shard_list_works_like_a_pattern(tmp_path, capsys):
    make_folder(tmp_path / "src", classes=2, per_class=4)
    shards_of(tmp_path / "src", tmp_path / "shards", 3, capsys)
    listed = [str(tmp_path / "shards" / f"train-{i:06d}.tar") for i in range(3)]
    by_list = data.build_loaders(shard_params(tmp_path / "shards", 3, train_shards=listed), section("train", batch_size=2), "cpu")
    by_pattern = data.build_loaders(shard_params(tmp_path / "shards", 3), section("train", batch_size=2), "cpu")
    assert [y.tolist() for _, y in by_list.train] == [y.tolist() for _, y in by_pattern.train]
    with pytest.raises(UserError, match="names no shard"):
        data.build_loaders(shard_params(tmp_path / "shards", 3, train_shards=[]), section("train"), "cpu")
