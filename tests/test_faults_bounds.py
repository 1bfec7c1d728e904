"""Bounds before work, and signals at any moment.

- Sizes no memory holds (params sizes, a checkpoint at a huge image size), JSON nested 100,000 deep in
  every file the project reads, paths thousands of folders deep, and --out into folders that do not
  exist: each is one sentence before anything is allocated or created.
- SIGINT and SIGTERM during start-up (inside an import: deterministic, from an import hook) and while a
  command runs: one line that fits the command, and exit 128 + signal.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import faults_util as fu
from helpers import ROOT, make_folder
from vit import ViTForImageClassification, cli, config
from vit.errors import UserError
from vit.train import loop

DEFAULT = os.path.join(ROOT, "params.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HF folder (3 classes, 16x16 RGB) and a folder of its images."""
    tmp = tmp_path_factory.mktemp("bounds")
    fu.tiny_model(id2label={i: f"class_{i}" for i in range(3)}).save_pretrained(tmp / "model")
    make_folder(tmp / "images", per_class=2)
    return tmp


# -----------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("sets, words", [
    (["data.image_size=4096"], ["1,048,577 tokens", "memory"]),  # params.json's patch 4: a million tokens an image
    (["model.hidden_size=1048576", "model.num_attention_heads=4"], ["parameters", "memory"]),
    (["model.hidden_size=1048576"], ["model.num_attention_heads=3", "hidden_size=1048576"]),
    (["model.num_hidden_layers=100000000"], ["parameters", "memory"]),
])
def test_sizes_no_memory_holds_are_one_sentence_through_main(tmp_path, sets, words):
    r = fu.run(["--set", *sets, f"output.dir={tmp_path / 'run'}"], tmp_path)
    fu.assert_clean_refusal(r, *words)  # exit 2, one line, no traceback, peak memory bounded
    assert not (tmp_path / "run").exists()
    fu.record("bounds", f"{' '.join(sets)}: one sentence before anything is allocated", 1)


def test_parameter_count_is_exact_and_memory_is_checked_against_the_machine(monkeypatch, model_dir):
    for kw in ({}, {"distilled": True}, {"num_register_tokens": 2, "layer_scale_init": 1e-5}, {"use_pre_logits": True},
               {"class_token": False, "global_pool": "avg", "fc_norm": True}, {"pre_norm": True, "qkv_bias": False}):
        model = fu.tiny_model(**kw)
        assert config.parameter_count(model.config) == model.num_parameters(), kw
    # a checkpoint asked for at an image size whose position embeddings no memory holds: refused before they are made
    monkeypatch.setattr(config, "machine_memory", lambda: 10**8)
    with pytest.raises(UserError, match="needs at least .* to hold its weights, more than this machine's 100 MB"):
        ViTForImageClassification.from_pretrained(model_dir / "model", image_size=4096)
    fu.record("bounds", "a checkpoint loaded at a size no memory holds (and exact parameter counts)", 1)


# -----------------------------------------------------------------------------
# JSON nested 100,000 deep, paths thousands of folders deep, --out into missing folders


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json", "model.safetensors.index.json"])
def test_json_nested_100000_deep_in_a_model_folder(model_dir, tmp_path, name):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir / "model", folder)
    if name == "config.json":
        cfg = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(cfg)[:-1] + ', "deep": ' + DEEP + "}")
    else:
        (folder / name).write_text('{"x": ' + DEEP + "}")
    with pytest.raises(UserError, match="100001 deep"):
        from vit.factory import load_model

        load_model(str(folder), "cpu")
    r = fu.run(["predict", "--checkpoint", str(folder), str(model_dir / "images")], tmp_path)
    fu.assert_clean_refusal(r, name, "deep")
    fu.record("bounds", f"{name} nested 100,000 deep: from_pretrained and predict", 2)


def test_paths_thousands_of_folders_deep_and_out_into_missing_folders(model_dir, tmp_path):
    deep = "d/" * 2000
    r = fu.run(["--set", f"output.dir={deep}"], tmp_path)
    fu.assert_clean_refusal(r, "output.dir", "2000 folders deep")
    r = fu.run(["features", "--checkpoint", str(model_dir / "model"), str(model_dir / "images"), "--out", deep + "f.npy"], tmp_path)
    fu.assert_clean_refusal(r, "--out", "folders deep")
    missing = tmp_path / "missing"
    for argv in (["export", "--out", str(missing / "m.onnx")], ["features", str(model_dir / "images"), "--out", str(missing / "f.npy")],
                 ["attention", str(model_dir / "images"), "--out", str(missing / "a" / "b")],
                 ["eval", "--data-dir", str(model_dir / "images"), "--out", str(missing / "eval.json")]):
        r = fu.run([argv[0], "--checkpoint", str(model_dir / "model"), *argv[1:]], tmp_path)
        fu.assert_clean_refusal(r, "--out", "does not exist")
        assert not missing.exists(), f"{argv[0]} made folders above its --out"
    fu.record("bounds", "output.dir and --out 2000 folders deep; export, features, attention, eval into a missing folder", 6)


# -----------------------------------------------------------------------------
# signals


IMPORT_HOOK = """
import os, runpy, signal, sys
class Hook:  # sends the signal as `{module}` starts to import: inside an import, every time
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{signal})
        return None
sys.meta_path.insert(0, Hook())
sys.argv = ["main.py", *{args!r}]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.parametrize("command, module, signum, line", [
    ([], "numpy", signal.SIGINT, "stopped by SIGINT while starting; nothing was written."),
    (["eval", "--checkpoint", "MODEL"], "torch.nn", signal.SIGTERM, "stopped by SIGTERM while starting; nothing was written."),
    (["predict", "--checkpoint", "MODEL", "IMAGES"], "vit.data.images", signal.SIGINT, "predict stopped by SIGINT; every file it wrote is whole, none is half-written."),
])
def test_a_signal_inside_an_import_is_one_line(model_dir, tmp_path, command, module, signum, line):
    """A KeyboardInterrupt raised inside an import left numpy half-made (a traceback about numpy.matrix) or
    was swallowed by a library; now the import is never resumed: one line, exit 128 + signal."""
    args = [str(model_dir / "model") if a == "MODEL" else str(model_dir / "images") if a == "IMAGES" else a for a in command]
    code = IMPORT_HOOK.format(module=module, signal=signal.Signals(signum).name, args=args)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=fu.env_for(), capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr.strip()) == (128 + signum, line), f"exit {r.returncode}\n{r.stderr[-3000:]}"
    fu.record("interrupts", f"{signal.Signals(signum).name} while importing {module} ({command[0] if command else 'train'})", 1)


@pytest.mark.parametrize("command, signum, line", [
    ("eval", signal.SIGINT, "eval stopped by SIGINT; every file it wrote is whole, none is half-written."),
    ("attention", signal.SIGTERM, "attention stopped by SIGTERM; every file it wrote is whole, none is half-written."),
])
def test_a_signal_while_a_command_runs_fits_the_command(model_dir, tmp_path, command, signum, line):
    argv = {"eval": ["--data-dir", str(model_dir / "images"), "--workers", "0"],
            "attention": [str(model_dir / "images"), "--out", str(tmp_path / "att")]}[command]
    r = fu.run([command, "--checkpoint", str(model_dir / "model"), *argv], tmp_path, at="eval:1",
               action=signal.Signals(signum).name[3:])  # inside the first forward pass
    assert r.returncode == 128 + signum and r.stderr.strip().splitlines()[-1] == line, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "checkpoint" not in line
    assert not (tmp_path / "att").exists() or not os.listdir(tmp_path / "att"), "a figure from a stopped forward pass"
    fu.record("interrupts", f"{signal.Signals(signum).name} in {command}: its own line, exit {128 + signum}", 1)


def test_a_second_signal_in_training_goes_to_the_command_line(monkeypatch):
    """Training's first signal asks for a save; a second stops at once through the command line's handler,
    with training's line and the signal's exit code."""
    with cli.Interrupts() as interrupts:
        interrupts.phase = "train"
        with loop.StopRequest() as stop:
            monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # the "saving at the next step" line
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert stop() and stop.signum == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt) as e:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
        assert e.value.args == (signal.SIGTERM,)
        assert interrupts.line(signal.SIGTERM) == "training stopped by SIGTERM without saving; the last saved checkpoint is kept as it was."
    fu.record("interrupts", "a second SIGTERM in training: through the command line, exit 143", 1)
