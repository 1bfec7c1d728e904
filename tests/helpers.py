"""Helpers shared by the tests (no tests here): tiny image folders and params files, running the command line, closeness.

Everything is tiny (width 32, depth 2, 16x16 images) so that a whole run takes a few seconds on CPU.
"""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_folder(root, classes=3, per_class=12, size=20, seed=0):
    """train/<class>/*.png whose dominant colour channel (or stripe position) is the class: learnable fast."""
    rng = np.random.default_rng(seed)
    names = [f"class_{c}" for c in range(classes)]
    for c, name in enumerate(names):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            a = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            a[:, :, c % 3] += 150
            a[(c // 3) * 4:(c // 3) * 4 + 4] = 255  # classes beyond 3 differ by a white stripe
            Image.fromarray(a).save(os.path.join(root, name, f"{i}.png"))
    return names


def tiny_params(tmp_path, folder, **train):
    """A params file for a 2-layer width-32 ViT on `folder` at 16x16, written into tmp_path; returns its path."""
    params = {
        "model": {"patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 64},
        "data": {"dataset": "folder", "train_dir": str(folder), "val_split": 0.25, "image_size": 16,
                 "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 1, "precision": "fp32", **train},
        "output": {"dir": str(tmp_path / "run"), "misclassified": 8},
    }
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    return str(path)


def section(name, **keys):
    """params.json's defaults for one section with `keys` changed: the whole section that
    build_loaders takes (it restates no default)."""
    from vit import params as P

    return {**P.defaults()[name], **keys}


def logged(caplog):
    """What the library logged on the `vit` logger (the load report, ...) since the last call, as text."""
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] == "vit")
    caplog.clear()
    return text


def run_main(argv, capsys):
    """The command line (vit.cli.main, what `python main.py` runs) in this process; returns (exit code, stdout, stderr)."""
    from vit import cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(args, timeout=240, **kw):
    """python main.py ... in a fresh process with one intra-op thread (the CI cores are shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def assert_close(ours, ref, what, tol=1e-5):
    """Same shape and max |ours - ref| / max |ref| <= tol, reporting both differences on failure."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    rel = diff / ref.abs().max().clamp_min(1e-12).item()
    assert rel <= tol, f"{what}: max abs diff {diff:.2e}, rel {rel:.2e}"
