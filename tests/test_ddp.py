"""The same main.py under torchrun with 2 CPU processes (gloo): it trains, only rank 0 prints and
writes (TensorBoard's event file too), and the run folder has the same layout as a single-process run."""

import importlib.util
import json
import os
import re

from helpers import make_folder, run_subprocess, tiny_params
from vit.factory import load_model

LAYOUT = {"params.json", "metrics.jsonl", "curves.png", "confusion.png", "misclassified.png",
          "per_class_accuracy.json", "last.pt", "best.pt", "best_hf"}


def test_torchrun_two_cpu_processes(tmp_path):
    make_folder(tmp_path / "images", classes=3, per_class=12)
    params = tiny_params(tmp_path, tmp_path / "images", epochs=2, batch_size=4, grad_accum=2)
    result = run_subprocess(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
                             "--params", params], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # rank 0 alone prints: each epoch line once, the setup line once
    assert [int(e) for e in re.findall(r"^Epoch : (\d+) - loss", out, re.M)] == [1, 2], out
    assert out.count("parameters,") == 1 and "effective batch 16" in out  # 4 per rank x 2 accumulation x 2 ranks
    run = tmp_path / "run"
    events = {n for n in os.listdir(run) if n.startswith("events.out.tfevents.")}
    assert set(os.listdir(run)) - events == LAYOUT, sorted(os.listdir(run))
    assert len(events) == (importlib.util.find_spec("tensorboard") is not None), events  # rank 0 alone writes them
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(0 <= h["val_acc"] <= 1 for h in history)
    # the checkpoint is a plain one: no DDP `module.` prefixes, loadable in one process
    model, info = load_model(str(run), "cpu")
    assert info["classes"] == ["class_0", "class_1", "class_2"] and model.config.num_labels == 3
