"""Everyday mistakes, tried as a new user would: resuming under another launcher or batch, a learning
rate shrunk by lr_scale_batch, not knowing how many images were used, eval not saying what it
evaluated, predict on a folder, figures that do not say what they show, --resume on a finished run.
"""

import json
import os
import re
import shlex
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

import faults_util as fu
from vit import cli
from vit import run_folder
from vit.viz import plots

ROOT = fu.ROOT


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The session's finished 1-epoch tiny run: (its folder, params path, run folder, its stdout), as Paths."""
    tmp, params, run, out = fu.finished_run(tmp_path_factory.mktemp("faults_finished"))
    return Path(tmp), params, Path(run), out


copy_run = fu.copy_run


# -----------------------------------------------------------------------------
# resuming


def test_resume_command_is_the_launch_that_was_used(monkeypatch):
    """The words that start a run again: python main.py, python -m vit, the vit script, torchrun (its own
    command line, read from the parent process), and torchrun's plain form when that cannot be read."""
    import time

    cases = [  # (the interpreter's own argv, sys.argv[0], the launcher)
        (["python3", "main.py", "--resume"], "main.py", ("python3", "main.py")),
        (["/usr/bin/python3", "-m", "vit", "--resume"], os.path.join(ROOT, "vit", "__main__.py"), ("/usr/bin/python3", "-m", "vit")),
        (["/usr/bin/python3", "/usr/local/bin/vit", "--resume"], "/usr/local/bin/vit", ("vit",)),
    ]
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for orig, argv0, want in cases:
        monkeypatch.setattr(sys, "orig_argv", orig)
        monkeypatch.setattr(sys, "argv", [argv0, "--resume"])
        assert cli.launcher() == want
    # torchrun: a stand-in parent whose command line is torchrun's
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "/usr/local/bin/torchrun",
                               "--nnodes=1", "--nproc_per_node=2", "main.py", "--params", "p.json"])
    try:
        time.sleep(0.2)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(sys, "argv", ["main.py", "--params", "p.json"])
        monkeypatch.setattr(os, "getppid", lambda: parent.pid)
        assert cli.launcher() == ("torchrun", "--nnodes=1", "--nproc_per_node=2", "main.py")
        monkeypatch.setattr(os, "getppid", lambda: 2**22 + 12345)  # no such process: the plain form
        assert cli.launcher() == ("torchrun", "--nproc_per_node=2", "main.py")
    finally:
        parent.kill()
        parent.wait()
    fu.record("mistakes", "the resume command names the launcher used (4 forms and a fallback)", 5)


def test_resume_of_a_finished_run_says_it_is_complete_with_the_command_used(finished, tmp_path):
    """A real `python -m vit ... --resume` (a fresh interpreter): the run is complete, the report is
    written again, and the way to train longer starts as this one did."""
    params = copy_run(finished, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "vit", "--params", params, "--resume"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    again = shlex.join([sys.executable, "-m", "vit", "--params", params, "--set", "train.epochs=11", "--resume"])
    assert "holds all 1 epoch of its run, which is complete" in r.stdout and again in r.stdout, r.stdout[-2000:]
    assert (tmp_path / "run" / "confusion.png").exists()
    fu.record("mistakes", "--resume on a finished run: says complete, how to extend, with python -m vit", 1)


def test_resume_with_another_effective_batch_is_refused(finished, tmp_path):
    params = copy_run(finished, tmp_path)
    r = fu.run(["--params", params, "--set", "train.batch_size=4", "--resume"], tmp_path)
    fu.assert_clean_refusal(r, "effective batch of 8", "gives 4", "train.grad_accum")
    # the same product (4 x accumulation 2) is the same schedule: it resumes
    r = fu.run(["--params", params, "--set", "train.batch_size=4", "train.grad_accum=2", "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    fu.record("mistakes", "resume with another batch refused, with an equal product allowed", 2)


def test_resume_of_a_two_process_run_in_one_process_is_refused(finished, tmp_path):
    """As if started by torchrun with 2 processes: resuming it in one halves the effective batch."""
    def two_processes(ckpt):
        ckpt.update(world_size=2, rng=ckpt["rng"] * 2, command="torchrun --nproc_per_node=2 main.py --params p.json --resume")

    params = copy_run(finished, tmp_path, two_processes)
    r = fu.run(["--params", params, "--resume"], tmp_path)
    fu.assert_clean_refusal(r, "2 process(es)", "effective batch of 16", "torchrun --nproc_per_node=2 main.py")
    fu.record("mistakes", "a 2-process run resumed in 1 process refused, naming the torchrun command", 1)


# -----------------------------------------------------------------------------
# what a run says at its start


def test_start_up_lines_count_the_images_and_what_drop_last_drops(finished):
    _, _, run, out = finished
    # 48 images: 12 split off for val, 36 to train; batch 8 uses 32 of them per epoch
    assert "data: 36 train images, 12 val images (val split off" in out and "by data.val_split 0.25" in out, out[-3000:]
    assert "drop_last leaves out 4 train image(s) per epoch" in out, out[-3000:]
    fu.record("mistakes", "the run prints its train/val counts and what drop_last leaves out", 1)


def test_lr_scale_batch_shows_the_derivation_and_warns_when_tiny(tmp_path):
    fu.make_folder(tmp_path / "data")
    params = fu.write_params(tmp_path / "params.json", fu.tiny_params(tmp_path / "data", tmp_path / "run", epochs=1))
    r = fu.run(["--params", params, "--set", "train.lr_scale_batch=4096"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lr 5.86e-06 (train.lr 0.003 x effective batch 8 / lr_scale_batch 4096)" in r.stdout, r.stdout[-3000:]
    assert "warning: lr_scale_batch makes the learning rate 5.9e-06" in r.stdout
    fu.record("mistakes", "lr_scale_batch: the start-up line shows base x batch / scale and warns when tiny", 1)


def test_cpu_smoke_doc_states_its_own_batch():
    with open(os.path.join(ROOT, "configs", "cpu_smoke.json")) as f:
        smoke = json.load(f)
    stated = re.search(r"(\d+)-image batch", smoke["_doc"])
    assert stated and int(stated.group(1)) == smoke["train"]["batch_size"], smoke["_doc"]
    fu.record("mistakes", "configs/cpu_smoke.json's _doc states the batch it sets", 1)


# -----------------------------------------------------------------------------
# eval and predict


def test_eval_says_what_it_evaluated(finished, tmp_path):
    tmp, _, run, _ = finished
    r = fu.run(["eval", "--checkpoint", str(run)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"evaluating {run / run_folder.BEST} on the run's val split of {tmp / 'data'} (12 images" in r.stdout, r.stdout[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"loss: \d\.\d{4} - acc: \d\.\d{4} - images/s: [\d,]+", line), line
    r = fu.run(["eval", "--checkpoint", str(run / run_folder.LAST), "--data-dir", str(tmp / "data"), "--workers", "0"], tmp_path)
    assert r.returncode == 0 and f"evaluating {run / run_folder.LAST} on --data-dir {tmp / 'data'} (48 images)" in r.stdout, r.stdout[-2000:]
    assert "(0 worker(s)" in r.stdout
    fu.record("mistakes", "eval names the checkpoint file and the data, images/s as a whole number", 2)


def test_eval_names_the_data_dir_option_and_bounds_its_workers(finished, tmp_path):
    tmp, _, run, _ = finished
    for bad, words in ((tmp_path / "missing", "is not a folder"), (tmp_path, "has no class sub-folders")):
        if bad == tmp_path:
            (tmp_path / "loose.png").write_bytes((tmp / "data" / "class_0" / "0.png").read_bytes())
        r = fu.run(["eval", "--checkpoint", str(run), "--data-dir", str(bad)], tmp_path)
        line = fu.assert_clean_refusal(r, "--data-dir", words)
        assert "data.train_dir" not in line, line
    r = fu.run(["eval", "--checkpoint", str(run), "--workers", "-1"], tmp_path)
    fu.assert_clean_refusal(r, "--workers -1")
    # the default: the run's data.workers, at most the CPU count (a run made on a 64-core machine, eval on this one)
    best = torch.load(run / run_folder.BEST, weights_only=True)
    best["params"]["data"]["workers"] = 64
    torch.save(best, tmp_path / "from_a_big_machine.pt")
    r = fu.run(["eval", "--checkpoint", str(tmp_path / "from_a_big_machine.pt"), "--data-dir", str(tmp / "data")], tmp_path)
    assert r.returncode == 0 and f"({min(64, os.cpu_count())} worker(s)" in r.stdout, r.stdout[-2000:]
    fu.record("mistakes", "eval: a bad --data-dir named as typed, --workers bounded and defaulted to the CPU count", 4)


def test_predict_on_a_folder_predicts_its_images(finished, tmp_path):
    tmp, _, run, _ = finished
    folder = tmp / "data" / "class_1"
    (folder / ".hidden.png").write_bytes((folder / "0.png").read_bytes())  # hidden: left out, as the training scan does
    r = fu.run(["predict", "--checkpoint", str(run), str(folder), "--topk", "1"], tmp_path)
    (folder / ".hidden.png").unlink()
    assert r.returncode == 0, r.stderr[-2000:]
    *lines, summary = r.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == sorted(str(p) for p in folder.glob("[!.]*.png")), lines
    assert summary.startswith(f"predicted {len(lines)} image(s) in "), summary
    r = fu.run(["predict", "--checkpoint", str(run), str(tmp_path)], tmp_path)  # an empty folder
    fu.assert_clean_refusal(r, str(tmp_path), "no image files")
    fu.record("mistakes", "predict on a folder predicts its images (and refuses an empty one)", 2)


# -----------------------------------------------------------------------------
# figures


@pytest.fixture
def figures(monkeypatch):
    """Capture the Figure each plot function saves, instead of writing a PNG."""
    saved = []

    def save(fig, path):
        fig.canvas.draw()  # lay it out, as savefig would
        saved.append(fig)
        return 0, 0

    monkeypatch.setattr(plots, "_save", save)
    return saved


def test_misclassified_titles_say_which_label_is_true_and_which_predicted(figures):
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    plots.plot_misclassified(images, ["coat", "bag"], ["shirt", "sandal"], "x.png")
    titles = [ax.get_title() for ax in figures[0].axes if ax.get_title()]
    assert titles == ["true: coat\npredicted: shirt", "true: bag\npredicted: sandal"], titles
    fu.record("mistakes", "misclassified.png titles say true and predicted", 1)


@pytest.mark.parametrize("epochs", [1, 2, 3, 40])  # one epoch: a single point, whose axis spans a tenth of an epoch
def test_curves_have_whole_epoch_ticks(figures, epochs):
    history = [{"epoch": e, "loss": 1.0 / e, "acc": 0.5, "val_loss": 1.0, "val_acc": 0.5} for e in range(1, epochs + 1)]
    plots.plot_curves(history, "x.png")
    for ax in figures[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    fu.record("mistakes", f"curves.png of {epochs} epoch(s) has whole-epoch ticks", 1)


@pytest.mark.parametrize("heads", [3, 12, 24])
def test_attention_distance_legend_fits_inside_the_figure(figures, heads):
    plots.plot_attention_distance(np.random.default_rng(0).random((12, heads)) * 100, "x.png")
    fig = figures[0]
    renderer = fig.canvas.get_renderer()
    legend, box = fig.legends[0].get_window_extent(renderer), fig.bbox
    assert box.x0 <= legend.x0 and legend.x1 <= box.x1 and box.y0 <= legend.y0 and legend.y1 <= box.y1, (legend, box)
    axes = fig.axes[0].get_window_extent(renderer)
    assert legend.y1 <= axes.y0, "the legend overlaps the axes"
    fu.record("mistakes", f"the attention-distance legend fits inside the figure ({heads} heads)", 1)
