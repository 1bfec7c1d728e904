"""params.json fuzzer: seeded mutations of a valid tiny params file (wrong types, negative / zero / huge /
non-finite values, unknown keys, deleted keys and sections, invalid JSON text). Every case either
validates or is refused with one line naming the key or the file; none ends in a traceback, through
`vit.params.load` (hundreds of cases) or through `python main.py` (a dozen).
"""

import copy
import json
import math
import os

import numpy as np
import pytest

import faults_util as fu
from vit.errors import UserError
from vit import params as P

N_CASES = 400
VALUES = [None, True, False, 0, -1, 1, 3, -0.5, 0.5, 1.5, 1e-12, 10**9, 10**30, 1e308, float("inf"), float("-inf"),
          float("nan"), "", "abc", "1", "fp16", "folder", [], [1], [0.5, 0.5, 0.5], ["a"], [0.1, 2], {}, {"x": 1}]
KINDS = ["value", "value", "value", "unknown_key", "delete_key", "delete_section", "section_type", "bad_json", "top_level"]


def base_params(tmp):
    return fu.tiny_params(tmp / "data", tmp / "run", epochs=1)


def mutate(params, rng):
    """(JSON text, kind, the dotted key it touched or None). Starts from a deep copy; 1-3 mutations."""
    p = copy.deepcopy(params)
    touched, kinds = [], []
    for _ in range(rng.integers(1, 4)):
        kind = KINDS[rng.integers(len(KINDS))]
        kinds.append(kind)
        section = list(P.SCHEMA)[rng.integers(4)]
        if kind == "value":  # any schema key, present in the file or not
            key = list(P.SCHEMA[section])[rng.integers(len(P.SCHEMA[section]))]
            if not isinstance(p.get(section), dict):
                p[section] = {}
            p[section][key] = VALUES[rng.integers(len(VALUES))]
            touched.append(f"{section}.{key}")
        elif kind == "unknown_key":
            name = "".join(rng.choice(list("abcdefghij_"), size=rng.integers(1, 8)))
            target = p.get(section) if rng.random() < 0.8 and isinstance(p.get(section), dict) else p
            target[name] = VALUES[rng.integers(len(VALUES))]
            touched.append(name)
        elif kind == "delete_key" and isinstance(p.get(section), dict) and p[section]:
            del p[section][list(p[section])[rng.integers(len(p[section]))]]
        elif kind == "delete_section":
            p.pop(section, None)
        elif kind == "section_type":
            p[section] = VALUES[rng.integers(len(VALUES))]
            touched.append(section)
    text = json.dumps(p)
    if "top_level" in kinds:
        text = json.dumps([p] if rng.random() < 0.5 else VALUES[rng.integers(len(VALUES))])
    if "bad_json" in kinds:
        cut = int(rng.integers(0, len(text)))
        text = [text[:cut], text[:cut] + "}" + text[cut:], text.replace('"', "'", 1), text[:-1] + ",}", ""][rng.integers(5)]
    return text, "+".join(kinds), touched


def numbers(obj):
    """Every number in a nested params dict."""
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in numbers(v)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """Each seeded case through vit.params.load: (text, kind, touched, outcome, detail)."""
    tmp = tmp_path_factory.mktemp("faults_params")
    rng = np.random.default_rng(0)
    base = base_params(tmp)
    cases = []
    for i in range(N_CASES):
        text, kind, touched = mutate(base, rng)
        path = tmp / f"case{i}.json"
        path.write_text(text)
        try:
            cases.append((str(path), text, kind, touched, "valid", P.load(str(path))))
        except UserError as e:
            cases.append((str(path), text, kind, touched, "refused", str(e)))
        except Exception as e:  # noqa: BLE001  the bug this test exists to find
            cases.append((str(path), text, kind, touched, "crashed", f"{type(e).__name__}: {e}"))
    return cases


def test_fuzzed_params_validate_or_are_refused_by_name(fuzzed):
    crashed = [(c[2], c[1][:200], c[5]) for c in fuzzed if c[4] == "crashed"]
    assert not crashed, f"{len(crashed)} case(s) ended in an exception that is not a UserError, e.g. {crashed[:3]}"
    for path, text, kind, touched, outcome, detail in fuzzed:
        if outcome != "refused":
            continue
        assert "\n" not in detail and len(detail) < 800, detail
        # the message points somewhere: the file, or a key / section name
        names = [path, "params key", "params keys", *touched, *P.SCHEMA]
        assert any(n in detail for n in names), f"{kind}: {detail!r} names neither the file nor a key"
    refused = sum(c[4] == "refused" for c in fuzzed)
    valid = sum(c[4] == "valid" for c in fuzzed)
    assert refused > N_CASES // 2 and valid > 20, (refused, valid)  # the fuzzer reaches both sides
    fu.record("params", f"mutated params files through vit.params.load ({refused} refused, {valid} valid)", len(fuzzed))


def test_fuzzed_params_that_validate_hold_only_finite_numbers(fuzzed):
    bad = [(c[2], c[3]) for c in fuzzed if c[4] == "valid" and not all(math.isfinite(n) for n in numbers(c[5]))]
    assert not bad, f"{len(bad)} validated case(s) hold NaN or Infinity, e.g. {bad[:5]}"


@pytest.mark.parametrize("override", [
    "train.lr=Infinity", "train.weight_decay=Infinity", "model.layer_norm_eps=Infinity", "data.mean=[NaN,0.5,0.5]",
    "data.std=[Infinity,1,1]", "train.clip_grad=Infinity", "train.lr=NaN", "train.hflip=NaN", "train.min_lr=-Infinity"])
def test_non_finite_numbers_are_refused(tmp_path, override):
    path = fu.write_params(tmp_path / "params.json", base_params(tmp_path))
    with pytest.raises(UserError) as e:
        P.load(path, [override])
    assert override.split("=")[0] in str(e.value)
    fu.record("params", f"non-finite value {override} refused", 1)


# -----------------------------------------------------------------------------
# through the command line


def cli_cases(fuzzed, k=8):
    """k refused fuzz cases of different kinds (the first of each), for the command line."""
    seen, out = set(), []
    for c in fuzzed:
        if c[4] == "refused" and c[2] not in seen:
            seen.add(c[2])
            out.append(c)
    return out[:k]


def test_fuzzed_params_through_main_stop_before_training_without_traceback(fuzzed, tmp_path):
    cases = cli_cases(fuzzed)
    for path, text, kind, touched, outcome, detail in cases:
        r = fu.run(["--params", path], tmp_path)
        line = fu.assert_clean_refusal(r)
        assert line == f"error: {detail}", (line, detail)  # the same sentence the validator gave
        assert "Epoch" not in r.stdout and not os.path.exists(os.path.join(os.path.dirname(path), "run", "last.pt"))
    fu.record("params", "refused params files through main.py (exit 2, no traceback)", len(cases))


def cheap(params):
    """Small enough to train here: the tiny sizes, one epoch."""
    m, d, t = params["model"], params["data"], params["train"]
    return (t["epochs"] <= 2 and d["image_size"] <= 32 and (m["hidden_size"] or 0) <= 64 and t["batch_size"] <= 32
            and (m["num_hidden_layers"] or 0) <= 2 and (m["intermediate_size"] or 0) <= 128 and d["workers"] <= 2
            and m["preset"] is None and m["pretrained"] is None and d["dataset"] == "folder" and t["grad_accum"] <= 8)


def test_a_sample_of_valid_fuzzed_params_trains(fuzzed, tmp_path):
    fu.make_folder(tmp_path / "data")
    valid = [c for c in fuzzed if c[4] == "valid" and cheap(c[5])][:3]
    assert len(valid) == 3
    for i, (path, text, kind, touched, outcome, params) in enumerate(valid):
        params = {**params, "data": {**params["data"], "train_dir": str(tmp_path / "data")},
                  "output": {**params["output"], "dir": str(tmp_path / f"run{i}")}}
        r = fu.run(["--params", fu.write_params(tmp_path / f"valid{i}.json", params)], tmp_path)
        assert r.returncode in (0, 2) and "Traceback" not in r.stderr, f"{kind} {touched}:\n{r.stderr[-3000:]}"
        if r.returncode == 2:
            fu.assert_clean_refusal(r)
    fu.record("params", "valid mutated params files trained through main.py", len(valid))


# mistakes the fuzzer's generic values do not reach: found by hand, each once through main.py
CRAFTED = {
    "preset with patch 0": (["--set", "model.preset=S/0", "model.patch_size=null", "model.hidden_size=null",
                             "model.num_hidden_layers=null", "model.num_attention_heads=null", "model.intermediate_size=null"],
                            None),
    "params file not UTF-8": (None, None),
    "output.dir empty": (["--set", "output.dir="], None),
    "output.dir is a file": (["--set", "output.dir=FILE"], None),
    "seed too large": (["--set", f"train.seed={2**70}"], None),
    "lr Infinity": (["--set", "train.lr=Infinity"], None),
    "unknown --set section": (["--set", "optimizer.lr=1"], None),
    "--set without =": (["--set", "train.epochs"], None),
}


def crafted_param(name):
    bug = CRAFTED[name][1]
    return pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=bug)) if bug else name


@pytest.mark.parametrize("name", [crafted_param(n) for n in CRAFTED])
def test_crafted_mistakes_stop_cleanly_through_main(tmp_path, name):
    fu.make_folder(tmp_path / "data")
    path = fu.write_params(tmp_path / "params.json", base_params(tmp_path))
    argv = CRAFTED[name][0]
    if argv is None:  # a note with a Latin-1 "é", as an editor on Windows may save it
        with open(path, "rb") as f:
            blob = f.read()
        with open(path, "wb") as f:
            f.write(blob[:-1] + b', "_doc": "r\xe9sum\xe9"}')
        argv = []
    argv = [a.replace("FILE", path) for a in argv]
    r = fu.run(["--params", path, *argv], tmp_path)
    assert r.returncode in (0, 2), f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if r.returncode == 2:
        fu.assert_clean_refusal(r)
    fu.record("params", f"crafted mistake through main.py: {name}", 1)


def test_real_interpreter_refuses_invalid_json(tmp_path):
    """One case through a fresh `python main.py`, the rest through the forked runner."""
    path = tmp_path / "params.json"
    path.write_text('{"train": {"epochs": 3,}}')
    r = fu.run_cli(["--params", str(path)])
    fu.assert_clean_refusal(r, str(path), "not valid JSON")


# -----------------------------------------------------------------------------
# params that pass a type check and used to fail later: in timm, mid-epoch, or at os.makedirs after
# the data and the model were built. Each is now refused at validation, naming the key (or it works).

def deep(n):
    return "[" * n + "]" * n


LATE = {  # --set items (or a params file's text, for "file:"), and the words the refusal must hold
    "randaugment rand-m9.5": (["train.randaugment=rand-m9.5"], ["train.randaugment", "rand-m9.5"]),
    "randaugment rand-mmax1.5": (["train.randaugment=rand-mmax1.5"], ["train.randaugment"]),
    "randaugment rand-inc1 (posterizes to 0 bits)": (["train.randaugment=rand-inc1"], ["train.randaugment", "Posterize"]),
    "randaugment rand-m1 (posterizes to 0 bits)": (["train.randaugment=rand-m1"], ["train.randaugment", "Posterize"]),
    "randaugment rand-m9-mstd5-inc1": (["train.randaugment=rand-m9-mstd5-inc1"], ["train.randaugment"]),
    "randaugment rand-w0": (["train.randaugment=rand-w0"], ["train.randaugment"]),
    "layer_decay 5e-324": (["train.layer_decay=5e-324"], ["train.layer_decay"]),
    "layer_decay 1e-300": (["train.layer_decay=1e-300"], ["train.layer_decay"]),
    "cutmix 5e-324": (["train.cutmix=5e-324"], ["train.cutmix"]),
    "mixup 1e-310": (["train.mixup=1e-310"], ["train.mixup"]),
    "mixup 1e308": (["train.mixup=1e308"], ["train.mixup"]),
    "epochs with 5000 digits": ([f"train.epochs={'1' * 5000}"], ["train.epochs", "digits"]),
    "seed 2**70": ([f"train.seed={2**70}"], ["train.seed", "2**63"]),
    "batch_size 10**30": ([f"train.batch_size={10**30}"], ["train.batch_size"]),
    "--set value 600 lists deep": ([f"data.mean={deep(600)}"], ["data.mean"]),
    "--set value 5000 lists deep": ([f"data.mean={deep(5000)}"], ["--set data.mean"]),
    "--set mean [0.5, (not valid JSON)": (["data.mean=[0.5,"], ["data.mean", "not valid JSON"]),
    "--set mean {\"a\": (not valid JSON)": (['data.mean={"a":'], ["data.mean", "not valid JSON"]),
    "lr \"1e-3\" (a string)": (['train.lr="1e-3"'], ["train.lr", "a string", "0.001"]),
    "output.dir with a NUL": (['output.dir="runs/a\\u0000b"'], ["output.dir", "NUL"]),
    "output.dir with a lone surrogate": (['output.dir="runs/\\ud800"'], ["output.dir", "surrogate"]),
    "train_dir with a NUL": (['data.train_dir="d\\u0000"'], ["data.train_dir", "NUL"]),
    "pretrained with a lone surrogate": (['model.pretrained="w\\udfff.pth"', "model.patch_size=null"], ["model.pretrained"]),
    "file: an integer with 5000 digits": ('{"train": {"epochs": ' + "7" * 5000 + "}}", ["digits"]),
    "file: lists 100,000 deep": ('{"data": {"mean": ' + deep(100_000) + "}}", ["100002 deep", "more than the 64"]),
    "file: lists 900 deep": ('{"data": {"mean": ' + deep(900) + "}}", ["902 deep"]),
    "file: lists 60 deep (read, then refused by name)": ('{"data": {"mean": ' + deep(60) + "}}", ["data.mean"]),
    "file: lr as a string": ('{"train": {"lr": "3e-4"}}', ["train.lr", "0.0003"]),
}


def late_case(tmp_path, name):
    """(argv for main.py, the params file): a valid tiny params file plus the case's change."""
    change, _ = LATE[name]
    if isinstance(change, str):  # the params file's whole text
        path = tmp_path / "case.json"
        path.write_text(change)
        return ["--params", str(path)], str(path)
    path = fu.write_params(tmp_path / "params.json", base_params(tmp_path))
    return ["--params", path, "--set", *change], path


@pytest.mark.parametrize("name", list(LATE))
def test_params_that_used_to_fail_later_are_refused_at_validation(tmp_path, name):
    argv, path = late_case(tmp_path, name)
    with pytest.raises(UserError) as e:
        P.load(path, argv[3:] if "--set" in argv else ())
    message = str(e.value)
    assert "\n" not in message and len(message) < 800, message
    for w in LATE[name][1]:
        assert w in message, f"{w!r} not in {message!r}"
    fu.record("late", f"{name} refused at validation", 1)


def test_params_that_used_to_fail_later_through_main(tmp_path):
    """A sample through the command line: exit 2 before the data is read (no data line, no run folder)."""
    fu.make_folder(tmp_path / "data")
    names = ["randaugment rand-inc1 (posterizes to 0 bits)", "cutmix 5e-324", "layer_decay 5e-324", "output.dir with a NUL",
             "--set value 600 lists deep", "file: lists 100,000 deep", "epochs with 5000 digits"]
    for name in names:
        argv, _ = late_case(tmp_path, name)
        r = fu.run(argv, tmp_path)
        fu.assert_clean_refusal(r, *LATE[name][1])
        assert "data: " not in r.stdout and not os.path.exists(tmp_path / "run"), r.stdout[-2000:]
    fu.record("late", "late-failing params refused through main.py before the data is read", len(names))


def test_a_warmup_longer_than_any_run_trains(tmp_path):
    """warmup_epochs=1e308 overflowed when rounded to steps; it is clipped to the run first, so the run
    is all warm-up and finishes."""
    fu.make_folder(tmp_path / "data")
    path = fu.write_params(tmp_path / "params.json", base_params(tmp_path))
    r = fu.run(["--params", path, "--set", "train.warmup_epochs=1e308"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    fu.record("late", "warmup_epochs=1e308 trains (clipped to the run)", 1)
