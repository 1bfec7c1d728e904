"""params.json: defaults, overrides, and validation messages that name the key and the choices;
plus the optimizer's pure pieces (schedule, decay groups, layer decay, batch scaling)."""

import json
import os

import pytest
import torch

from helpers import ROOT, run_main
from vit import ViTConfig, ViTForImageClassification
from vit.errors import UserError
from vit.train import optim
from vit import params as P
from vit import schema


def load_with(*overrides):
    return P.load(os.path.join(ROOT, "params.json"), overrides)


def error_of(*overrides):
    with pytest.raises(UserError) as e:
        load_with(*overrides)
    return str(e.value)


@pytest.mark.parametrize("name", ["params.json"] + [f"configs/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "configs")))])
def test_shipped_params_are_valid(name):
    p = P.load(os.path.join(ROOT, name))
    assert set(p) == {"model", "data", "train", "output"}


def test_default_recipe_is_the_cpu_sized_fashion_mnist_one():
    # params.json is sized for a 2-core CPU (>= 90% in 15 minutes, README's cost table); the GPU recipe is a config.
    # Pinned parameter counts (big_vision's habit): a changed shape must be a deliberate change of this test.
    from vit.factory import build_model
    p = load_with()
    assert p["data"]["dataset"] == "fashion_mnist" and p["data"]["image_size"] == 28 and p["data"]["channels"] == 1
    assert p["train"]["precision"] == "auto" and p["train"]["epochs"] == 30 and p["train"]["time_budget"] == 15 and p["model"]["weight_init"] == "jax"
    assert sum(t.numel() for t in build_model(p, list("0123456789")).parameters()) == 306_826
    gpu_file = os.path.join(ROOT, "configs", "vit_lite_7_4_gpu.json")
    gpu = P.load(gpu_file)
    with open(gpu_file) as f:
        assert gpu["train"]["epochs"] == 60 and "UNMEASURED" in f.read()  # its GPU target, stated as not yet measured
    assert sum(t.numel() for t in build_model(gpu, list("0123456789")).parameters()) == 3_710_218


def test_params_json_the_defaults_and_the_readme_table_agree():
    """One source of defaults: params.json states every key with the schema's default (the model's
    architecture and the time budget, null by default, with the default run's values), and the
    README's table lists each."""
    import re

    with open(os.path.join(ROOT, "params.json")) as f:
        stated = json.load(f)
    defaults = P.defaults()
    assert {s: set(keys) - {P.DOC_KEY} for s, keys in stated.items() if s != P.DOC_KEY} == {s: set(k) for s, k in defaults.items()}
    differ = [f"{s}.{k}" for s in defaults for k in defaults[s] if stated[s][k] != defaults[s][k]]
    own = {f"{s}.{k}" for s, keys in schema.DEFAULT_RUN_ONLY.items() for k in keys}
    assert set(differ) <= own, f"params.json differs from the defaults at {differ}"
    assert all(defaults[s][k] is None for s, keys in schema.DEFAULT_RUN_ONLY.items() for k in keys)
    with open(os.path.join(ROOT, "README.md")) as f:
        rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| (.*) \|$", f.read(), re.M) if m.group(1) in defaults}
    assert set(rows) == set(defaults), "the README's params table has a row per section"
    for section, row in rows.items():
        table = {k: json.loads(v) for k, v in re.findall(r"`(\w+)=([^`]+)`", row)}
        assert table == defaults[section], f"README's {section} row: {table} != the defaults {defaults[section]}"


def test_overrides_parse_json_and_fall_back_to_strings():
    p = load_with("train.epochs=3", "train.lr=3e-4", "data.mean=[0.5]", "train.precision=fp16",
                  "output.dir=runs/x", "train.layer_decay=null", "train.compile=true")
    assert p["train"]["epochs"] == 3 and p["train"]["lr"] == 3e-4 and p["data"]["mean"] == [0.5]
    assert p["train"]["precision"] == "fp16" and p["output"]["dir"] == "runs/x"
    assert p["train"]["layer_decay"] is None and p["train"]["compile"] is True


def test_unknown_key_is_named_with_a_suggestion_and_the_valid_keys():
    msg = error_of("train.eopchs=3")
    assert "train.eopchs" in msg and "did you mean train.epochs" in msg and "batch_size" in msg
    # a key that lives in another section: point at it
    msg = error_of("data.batch_size=64")
    assert "data.batch_size" in msg and "train.batch_size" in msg
    assert "optimizer" in error_of("optimizer.lr=1") and "model, data, train, output" in error_of("optimizer.lr=1")


@pytest.mark.parametrize("override, words", [
    ("train.epochs=\"3\"", ["train.epochs", "integer"]),
    ("train.epochs=true", ["train.epochs", "integer"]),
    ("train.compile=1", ["train.compile", "true or false"]),
    ("train.lr=0", ["train.lr", "greater than 0"]),
    ("train.lr=-0.1", ["train.lr", "greater than 0"]),
    ("train.epochs=0", ["train.epochs", "greater than 0"]),
    ("train.batch_size=0", ["train.batch_size", "greater than 0"]),
    ("data.val_split=1.0", ["data.val_split", "between 0 and 1"]),
    ("data.val_split=0", ["data.val_split", "between 0 and 1"]),
    ("train.precision=fp8", ["train.precision", "\"bf16\", \"fp16\", \"fp32\""]),
    ("data.dataset=imagenet", ["data.dataset", "\"fashion_mnist\", \"folder\""]),
    ("data.channels=2", ["data.channels", "[1, 3]"]),
    ("data.mean=[0.5,0.5,0.5]", ["data.mean", "data.channels is 1"]),
    ("data.image_size=30", ["data.image_size", "patch size 4"]),
    ("model.num_attention_heads=5", ["model.num_attention_heads", "hidden_size=96"]),
    ("model.preset=\"X/16\"", ["model.preset", "B/16"]),
    ("train.random_resized_crop_scale=[0.9,0.1]", ["train.random_resized_crop_scale", "0 < lo <= hi <= 1"]),
    ("train.min_lr=1", ["train.min_lr", "train.lr"]),
    ("train.randaugment=augmix", ["train.randaugment", "rand-m9-mstd0.5"]),
    ("data.dataset=folder", ["data.train_dir", "folder"]),
    ("train.layer_decay=1.5", ["train.layer_decay", "at most 1"]),
    ("train.lr=Infinity", ["train.lr", "Infinity", "finite"]),
    ("data.mean=[NaN]", ["data.mean", "NaN", "finite"]),
    ("model.preset=\"S/0\"", ["model.preset", "positive patch size"]),
    ("data.image_size=1000000", ["data.image_size", "between 1 and 4096"]),
    ("output.dir=", ["output.dir", "empty"]),
    ("train.ema_decay=1", ["train.ema_decay", "strictly between 0 and 1"]),
    ("train.grad_checkpointing=1", ["train.grad_checkpointing", "true or false"]),
    ("output.best_metric=val_acc_ema", ["output.best_metric", "train.ema_decay is null"]),
    ("output.best_metric=val_loss", ["output.best_metric", "\"val_acc\", \"val_acc_ema\""]),
    ("model.pretrained_ema=true", ["model.pretrained_ema", "model.pretrained is null"]),
])
def test_impossible_values_are_refused_by_name(override, words):
    msg = error_of(override)
    for w in words:
        assert w in msg, (w, msg)


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train": {"epochs": 3,}\n}\n')
    with pytest.raises(UserError) as e:
        P.load(str(path))
    assert str(path) in str(e.value) and "line 2" in str(e.value) and "column" in str(e.value)


def test_a_params_file_not_in_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"_doc": "résumé"}'.encode("latin-1"))
    with pytest.raises(UserError) as e:
        P.load(str(path))
    assert str(path) in str(e.value) and "save it as UTF-8" in str(e.value)


def test_a_doc_key_is_allowed_but_must_be_text(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"_doc": "note", "train": {"_doc": "x", "epochs": 2}, "model": {"preset": "Ti/4"}}))
    assert P.load(str(path))["train"]["epochs"] == 2
    path.write_text(json.dumps({"_doc": 3}))
    with pytest.raises(UserError, match="_doc must be a string"):
        P.load(str(path))


def test_main_prints_one_line_and_exits_2(tmp_path, capsys):
    code, out, err = run_main(["--params", os.path.join(ROOT, "params.json"), "--set", "train.lr=-1"], capsys)
    assert code == 2 and err.strip().startswith("error: params key train.lr") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


# -----------------------------------------------------------------------------
# optimizer pieces


def test_schedule_warms_up_linearly_then_cosines_to_min_lr():
    lr = lambda s: optim.lr_at(s, base_lr=1.0, min_lr=0.1, warmup_steps=10, totals=[(0, 110)])  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(4) == pytest.approx(0.5) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))


def test_lr_scaling_rule_uses_the_effective_batch():
    t = {"lr": 1e-3, "lr_scale_batch": 256, "batch_size": 64, "grad_accum": 2}
    assert optim.scaled_lr(t, world_size=4) == pytest.approx(2e-3)
    assert optim.scaled_lr({**t, "lr_scale_batch": None}, world_size=4) == 1e-3


def tiny_model():
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=4, num_labels=3))


def test_weight_decay_only_on_matrices_and_layer_decay_by_depth():
    model = tiny_model()
    groups = optim.param_groups(model, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim < 2 or "cls_token" in n or "position_embeddings" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
            expected = 0.5 ** (2 + 1 - optim.layer_id(n, 2))
            assert g["lr_scale"] == pytest.approx(expected), n
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    scales = {optim.layer_id(n, 2): 0.5 ** (3 - optim.layer_id(n, 2)) for n in names.values()}
    assert scales == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    opt = torch.optim.AdamW(groups, lr=1.0)
    optim.set_lr(opt, 2.0)
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.25, 0.5, 1.0, 2.0]


def test_freeze_backbone_leaves_only_the_head():
    model = tiny_model()
    optim.freeze_backbone(model)
    groups = optim.param_groups(model, 0.05)
    assert sum(p.numel() for g in groups for p in g["params"]) == 32 * 3 + 3
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("key,value", [("layer_norm_eps", "1e-5"), ("qkv_bias", "false"), ("weight_init", "jax")])
def test_architecture_keys_beside_pretrained_are_refused_not_ignored(key, value):
    sizes = [f"model.{k}=null" for k in ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")]
    msg = error_of("model.pretrained=x.npz", *sizes, f"model.{key}={value}")
    assert f"model.{key}" in msg and "model.pretrained decides the architecture" in msg
