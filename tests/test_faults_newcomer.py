"""A newcomer's path, tried as one would: settings that were silently ignored or dropped, fine-tuning from
the default params.json in one launch, a gray run's best_hf/ in transformers' pipeline, files that follow
the umask, the installed command in an empty folder (`vit init`), help for every option, and the small
things that each cost a newcomer a launch. Each case works, or stops with one sentence.
"""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image

import faults_util as fu
from helpers import ROOT, logged, make_folder
from vit import cli, factory
from vit import params as P
from vit.errors import UserError
from vit.factory import load_model
from vit.train import checkpoint

DEFAULT = os.path.join(ROOT, "params.json")
# params.json's run on a tiny folder read as gray (what `python main.py` trains, in seconds): its own sizes
ON_A_TINY_FOLDER = ["data.dataset=folder", "data.image_size=16", "data.workers=0", "data.val_split=0.25", "train.epochs=1",
                    "train.batch_size=8", "train.precision=fp32", "output.misclassified=4"]


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """(a folder of 3 classes read as 1 channel, the run folder of params.json's model trained 1 epoch on it)."""
    tmp = tmp_path_factory.mktemp("newcomer")
    make_folder(tmp / "data")
    run_dir = tmp / "run"
    r = fu.run(["--set", f"data.train_dir={tmp / 'data'}", f"output.dir={run_dir}", *ON_A_TINY_FOLDER], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "data", run_dir


# -----------------------------------------------------------------------------
# settings that were silently ignored


def test_repeated_set_options_accumulate():
    args = cli.parse_args(["--set", "train.epochs=3", "--set", "train.lr=0.001", "data.workers=0"])
    assert args.set == ["train.epochs=3", "train.lr=0.001", "data.workers=0"], args.set
    assert cli.parse_args(["train", "--set", "a=1", "--resume", "--set", "b=2"]).set == ["a=1", "b=2"]
    fu.record("newcomer", "repeated --set options accumulate (argparse kept the last group)", 1)


def test_a_preset_set_after_the_file_replaces_its_sizes_and_says_so(caplog):
    p = P.load(DEFAULT, ["model.preset=S/4"])
    assert p["model"]["preset"] == "S/4" and all(p["model"][k] is None for k in P.SIZES)
    said = logged(caplog)
    assert said.count("\n") == 0 and "model.preset \"S/4\" decides the architecture" in said, said
    assert all(f"model.{k}=" in said for k in P.SIZES) and "weight_init" not in said, said  # the init applies to a preset too
    model = factory.build_model(p, ["a", "b"])
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.patch_size) == (384, 12, 4)
    # sizes written beside a preset, in one source, still refine it; sizes written after a checkpoint are a conflict
    p = P.load(DEFAULT, ["model.preset=S/4", "model.num_hidden_layers=2"])
    assert p["model"]["num_hidden_layers"] == 2 and p["model"]["hidden_size"] is None
    with pytest.raises(UserError, match="model.hidden_size is set but model.pretrained decides the architecture"):
        P.load(DEFAULT, ["model.pretrained=x.pth", "model.hidden_size=64"])
    p = P.load(DEFAULT, ["model.pretrained=x.pth", "model.preset=Ti/4"])  # the later one wins
    assert p["model"]["pretrained"] is None and p["model"]["preset"] == "Ti/4"
    fu.record("newcomer", "a later model.preset replaces the file's sizes, said once; conflicts named", 4)


def test_finetune_from_the_default_params_in_one_launch(gray, tmp_path):
    """--set model.pretrained on params.json: the checkpoint decides the architecture (the file's six size
    keys ignored, said in one line), and RGB weights on gray data are said at start-up with what is in force."""
    data, _ = gray
    rgb = fu.tiny_model(id2label={i: f"c{i}" for i in range(5)})  # 3 channels, 16x16, a head for 5 classes
    rgb.save_pretrained(tmp_path / "rgb")
    r = fu.run(["--set", f"model.pretrained={tmp_path / 'rgb'}", f"data.train_dir={data}", f"output.dir={tmp_path / 'run'}",
                *ON_A_TINY_FOLDER], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    ignored = [line for line in r.stdout.splitlines() if "decides the architecture" in line]
    assert len(ignored) == 1, r.stdout[-3000:]
    for key in ("patch_size=4", "hidden_size=96", "num_hidden_layers=4", "num_attention_heads=3", "intermediate_size=192",
                'weight_init="jax"'):
        assert f"model.{key}" in ignored[0], ignored[0]
    note = [line for line in r.stdout.splitlines() if line.startswith("note: model.pretrained")]
    assert len(note) == 1 and "3-channel (RGB)" in note[0] and "data.channels is 1" in note[0], r.stdout[-3000:]
    assert "data.mean [0.286]" in note[0] and "data.std [0.353]" in note[0] and "train.lr 0.002" in note[0], note[0]
    # the new head is said once, by its note, not again as fresh and ignored keys
    assert r.stdout.count("new classifier for num_labels=3") == 1 and "classifier.weight" not in r.stdout, r.stdout[-3000:]
    saved = json.loads((tmp_path / "run" / "params.json").read_text())["model"]
    assert saved["pretrained"] == str(tmp_path / "rgb") and saved["hidden_size"] is None
    fu.record("newcomer", "fine-tuning from params.json in one launch: ignored keys and the channel change said once", 1)


# -----------------------------------------------------------------------------
# the run folder's files


def test_a_gray_runs_best_hf_works_in_transformers_pipeline(gray):
    """params.json's run is gray (1 channel); transformers' pipeline feeds RGB. best_hf/ takes RGB and gives
    what the gray model gives on the gray image, up to the resize each does."""
    transformers = pytest.importorskip("transformers")
    data, run_dir = gray
    hf = run_dir / "best_hf"
    assert json.loads((hf / "config.json").read_text())["num_channels"] == 3
    pipe = transformers.pipeline("image-classification", model=str(hf), device="cpu")
    model, info = load_model(str(run_dir / "best.pt"), torch.device("cpu"))
    from vit.data.inputs import preprocess

    for path in sorted((data / "class_1").glob("*.png"))[:3]:
        got = {d["label"]: d["score"] for d in pipe(Image.open(path), top_k=3)}
        with torch.no_grad():
            ours = model(preprocess(str(path), info)).logits.softmax(-1)[0]
        want = {info["classes"][i]: p for i, p in enumerate(ours.tolist())}
        assert got.keys() == want.keys() and max(abs(got[k] - want[k]) for k in want) < 0.03, (got, want)
    # fine-tuning the folder on gray data again sums the spread kernel back: the run's own weights
    back = torch.nn.Module.state_dict(type(model).from_pretrained(str(hf), num_channels=1))
    key = "vit.embeddings.patch_embeddings.projection.weight"
    assert torch.allclose(back[key], model.state_dict()[key], atol=1e-6)
    fu.record("newcomer", "a gray run's best_hf/ in transformers' image-classification pipeline", 1)


def test_files_follow_the_umask(gray, tmp_path):
    _, run_dir = gray
    probe = tmp_path / "probe"
    probe.write_text("")  # what this process's umask makes of a new file
    want = stat.S_IMODE(probe.stat().st_mode)
    modes = {str(p.relative_to(run_dir)): stat.S_IMODE(p.stat().st_mode) for p in run_dir.rglob("*") if p.is_file()}
    assert modes and all(m == want for m in modes.values()), (oct(want), {k: oct(m) for k, m in modes.items()})
    old = os.umask(0o027)
    try:
        checkpoint.save_hf(fu.tiny_model(num_channels=1), str(tmp_path / "hf"), [0.3], [0.3])
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "preprocessor_config.json"], 0o640), modes
    fu.record("newcomer", "run files and best_hf/ follow the umask (022 and 027)", 2)


# -----------------------------------------------------------------------------
# the installed command


def test_recipes_shipped_in_the_package_are_the_checkouts():
    from vit import starter

    shipped = starter.recipes()
    on_disk = {"params.json": DEFAULT, **{f"configs/{f}": os.path.join(ROOT, "configs", f)
                                          for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".json")}}
    assert sorted(shipped) == sorted(on_disk), "vit/recipes/ and the checkout list other files"
    for name, path in on_disk.items():
        with open(path, "rb") as f:
            assert shipped[name] == f.read(), f"vit/recipes/{name} differs from {name}: copy it over"


def test_vit_in_an_empty_folder_says_init_and_init_then_trains(gray, tmp_path):
    data, _ = gray
    empty = tmp_path / "empty"
    empty.mkdir()
    r = fu.run([], tmp_path, cwd=empty)
    fu.assert_clean_refusal(r, "no params.json", "init")
    r = fu.run(["init", "sub/deeper"], tmp_path, cwd=empty)
    fu.assert_clean_refusal(r, "does not exist")
    r = fu.run(["init"], tmp_path, cwd=empty)
    assert r.returncode == 0 and "configs/cpu_smoke.json" in r.stdout, r.stderr[-2000:]
    assert sorted(os.listdir(empty / "configs")) == sorted(os.listdir(os.path.join(ROOT, "configs")))
    r = fu.run(["init"], tmp_path, cwd=empty)
    fu.assert_clean_refusal(r, "params.json already exists")
    r = fu.run(["--params", "configs/cpu_smoke.json", "--set", "data.dataset=folder", f"data.train_dir={data}",
                "data.image_size=14", "train.batch_size=8"], tmp_path, cwd=empty)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (empty / "runs" / "cpu_smoke" / "best.pt").is_file()
    fu.record("newcomer", "vit in an empty folder: says init; init writes; refuses to overwrite; cpu_smoke trains there", 4)


def test_pip_install_then_init_and_train_outside_the_checkout(gray, tmp_path):
    """The package as pip builds it (only pyproject.toml, README.md and vit/ copied, no dependencies
    fetched): the recipes are inside, and its `vit` command inits and trains in an empty folder."""
    data, _ = gray
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "vit"), src / "vit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    target = tmp_path / "installed"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named pip" in r.stderr:
        pytest.skip("no pip in this Python")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / "vit" / "recipes" / "configs" / "cpu_smoke.json").is_file()
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(target / "bin" / "vit"), "init"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and (work / "params.json").is_file(), r.stderr[-3000:]
    r = subprocess.run([sys.executable, str(target / "bin" / "vit"), "--params", "configs/cpu_smoke.json", "--set",
                        "data.dataset=folder", f"data.train_dir={data}", "data.image_size=14", "train.batch_size=8"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "done: 1 epoch" in r.stdout, r.stderr[-3000:]
    assert os.path.dirname(__import__("vit").__file__) != str(target / "vit")  # this process still tests the checkout
    fu.record("newcomer", "pip install, then vit init and a training run in an empty folder", 1)


# -----------------------------------------------------------------------------
# help and README


def test_every_option_has_help_and_the_top_level_shows_training():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in [("vit", parser), *subparsers.items()]
               for a in p._actions if a.help is None]
    assert not missing, f"options without help: {missing}"
    text = parser.format_help()
    assert all(option in text for option in ("--params", "--set", "--resume")), text
    fu.record("newcomer", "help text for every option; the top-level --help shows training's options", 1)


def test_readme_leads_with_what_a_user_does_and_speaks_no_history():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines()  # the two commands stay the first thing
    assert lines[3].startswith("bash setup.sh && python3 main.py ") and lines[4].startswith("bash setup.sh && python3 -m pytest")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    first = [h.lower() for h in headings[:3]]
    assert any("train" in h for h in first) and any("predict" in h or "classify" in h for h in first), headings
    assert any("fine-tun" in h for h in first), headings
    layout = text.index("\n| where | what |\n|---|---|\n| `main.py`")  # the file map
    assert layout > max(text.index(h) for h in headings[:3]), "the file map comes after what a user does"
    assert "main.py --set model.pretrained=" in text and "configs/finetune_in21k_b16.json" in text
    for word in ("issue 4", "the issue", "issue's", "the seeds'", "seeds' recipe"):
        assert word not in text, f"README speaks of the project's history: {word!r}"
    fu.record("newcomer", "README: train, predict and fine-tune first, the file map below, no history words", 1)


# -----------------------------------------------------------------------------
# papercuts: each cost a launch


def test_papercuts_through_main(gray, tmp_path):
    data, run_dir = gray
    one_class = tmp_path / "one"
    shutil.copytree(data / "class_0", one_class / "class_0")
    r = fu.run(["--set", "data.dataset=folder", f"data.train_dir={one_class}", f"output.dir={tmp_path / 'r1'}"], tmp_path)
    fu.assert_clean_refusal(r, str(one_class), "one class folder")
    r = fu.run(["--params", str(tmp_path)], tmp_path)
    fu.assert_clean_refusal(r, str(tmp_path), "is a folder", "params.json")
    # a checkpoint's patch 4 does not divide 18: refused before any image is decoded (no data line, no run folder)
    fu.tiny_model().save_pretrained(tmp_path / "rgb")
    r = fu.run(["--set", f"model.pretrained={tmp_path / 'rgb'}", "data.dataset=folder", f"data.train_dir={data}",
                "data.image_size=18", "data.in_memory=true", f"output.dir={tmp_path / 'r2'}"], tmp_path)
    fu.assert_clean_refusal(r, "image_size=18", "patch_size=4")
    assert "data: " not in r.stdout and not (tmp_path / "r2").exists(), r.stdout[-2000:]
    # one unreadable file in a folder: predict and features both do the rest and exit 1
    images = tmp_path / "images"
    shutil.copytree(data / "class_0", images)
    (images / "broken.png").write_bytes(b"not a png")
    r = fu.run(["predict", "--checkpoint", str(run_dir), str(images)], tmp_path)
    assert r.returncode == 1 and "broken.png: cannot read" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = fu.run(["features", "--checkpoint", str(run_dir), str(images), "--out", str(tmp_path / "f.npy")], tmp_path)
    assert r.returncode == 1 and "broken.png: cannot read" in r.stderr and (tmp_path / "f.npy").is_file(), r.stderr[-2000:]
    fu.record("newcomer", "one class, --params a folder, a patch refused before decoding, predict = features on a bad file", 4)


def test_did_you_mean_knows_other_names():
    for typed, meant in (("train.learning_rate", "train.lr"), ("train.num_epochs", "train.epochs"),
                         ("model.embed_dim", "model.hidden_size"), ("data.num_workers", "data.workers"),
                         ("output.lr", "train.lr"), ("train.warmpu_epochs", "train.warmup_epochs")):
        with pytest.raises(UserError, match=f"did you mean {meant}\\?"):
            P.load(DEFAULT, [f"{typed}=1"])
    assert set(P.ALIASES.values()) <= {k for keys in P.SCHEMA.values() for k in keys}, "an alias names no key"
    fu.record("newcomer", "did you mean: other tools' names and close keys in other sections", 6)

