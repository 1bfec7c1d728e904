"""params.json: loading, `--set` overrides and validation against the schema (vit/schema.py).

Everything a run does is described by one sectioned dict (model, data, train, output). It is
checked in full before anything runs, so a typo or an impossible value stops the run with one
sentence that names the key, instead of a traceback an hour later. A key called "_doc" may hold a
free-text note (command, expected runtime, expected accuracy) in any section; it is ignored.

vit/schema.py's SCHEMA is the one place a default lives, and its defaults are the default run's: params.json states
every key with these values, so a params file that leaves a key out gets what `python main.py` uses.
The exceptions (DEFAULT_RUN_ONLY) are what only the default run chooses: the model's architecture,
null by default, as a preset, a pretrained checkpoint or explicit sizes decide it; and the time budget,
null by default, so that another file's train.epochs is trained as given (tests/test_params.py keeps
params.json, SCHEMA and the README's table in agreement). Plain Python: the training run, `vit eval`
and the benchmarks read it.
"""

import copy
import difflib
import json
import logging
import math
import os
import re
from typing import Iterable, Optional, Sequence

from vit import files
from vit.config import PRESET_RE, PRESETS, ViTConfig, check_memory
from vit.errors import UserError, path_problem, special_file_kind
from vit.schema import ALIASES, AUGMENTATION_OFF, FROM_SCRATCH, NUMBER, SCHEMA, SIZES

logger = logging.getLogger(__name__)

MAX_BUDGET_MIN = 10**6  # minutes; a longer budget is no budget
DOC_KEY = "_doc"
MAX_INT = 2**63 - 1  # beyond it no count, size or seed means anything, and float() of it may overflow
MAX_NESTING = 8  # a value is a number, a string or a flat list: deeper JSON is a mistake (and deepcopy recurses on it)
ALPHA = (0.01, 100)  # mixup/cutmix Beta(alpha, alpha): numpy draws NaN below ~1e-300, and nothing else is useful


def defaults() -> dict:
    """The built-in params, a fresh nested dict."""
    return {section: {k: copy.deepcopy(spec[0]) for k, spec in keys.items()} for section, keys in SCHEMA.items()}


def load(path: Optional[str] = None, overrides: Sequence[str] = ()) -> dict:
    """Defaults <- the JSON file (if any) <- `--set` overrides, validated; the one entry point."""
    params, written = defaults(), {}
    updates = [] if path is None else [(path, read_json(path))]
    for source, update in updates + [("--set", nest(*parse_override(item))) for item in overrides]:
        merge(params, update, source=source)
        _later_architecture(params, update.get("model", {}), source, written)
    validate(params)
    return params


def _later_architecture(params, model, source, written):
    """The later-written one wins: a model.preset or model.pretrained that `source` sets (its model section
    is `model`) replaces the architecture keys earlier sources wrote (a preset: the sizes and a
    checkpoint; a checkpoint: the preset and every from-scratch key), said in one line on the `vit`
    logger. `written` maps each model key to the source that last wrote it. Keys one source writes
    together stay: explicit sizes beside a preset refine it, and sizes beside a checkpoint are refused."""
    if model.get("pretrained") is not None:
        key, replaced = "pretrained", ("preset", *FROM_SCRATCH)
    elif model.get("preset") is not None:
        key, replaced = "preset", (*SIZES, "pretrained")
    else:
        key, replaced = None, ()
    dropped = {k: params["model"][k] for k in replaced if k not in model and k in written and params["model"][k] is not None}
    if dropped:
        for k in dropped:
            params["model"][k] = None
        earlier = " and ".join(dict.fromkeys(written[k] for k in dropped))
        logger.warning("%s: model.%s %s decides the architecture, so %s's %s %s ignored", source, key,
                       json.dumps(model[key]), earlier, ", ".join(f"model.{k}={json.dumps(v)}" for k, v in dropped.items()),
                       "is" if len(dropped) == 1 else "are")
    written.update(dict.fromkeys(model, source))


def read_json(path):
    """The JSON object in `path`, or a UserError naming the file (and the line and column of a syntax error)."""
    kind = "a folder" if os.path.isdir(path) else special_file_kind(path)
    if kind is not None:
        inside = f" (e.g. {os.path.join(path, 'params.json')})" if os.path.isdir(path) else ""
        raise UserError(f"params file {path} is {kind}, not a file; pass a params file{inside} to --params.")
    if not os.path.isfile(path):
        raise UserError(f"params file {path} does not exist; pass an existing file to --params.")
    obj = files.read_json(path, "params file")
    if not isinstance(obj, dict):
        raise UserError(f"{path} must hold a JSON object with sections {list(SCHEMA)}, not {type(obj).__name__}.")
    return obj


def parse_override(item):
    """'train.lr=3e-4' -> ('train.lr', 0.0003); the value is JSON when it parses, else a string."""
    if "=" not in item:
        raise UserError(f"--set {item!r} needs the form section.key=value, e.g. train.epochs=3.")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        return key, files.parse_json(raw, f"--set {key}")
    except UserError:
        # meant as a list, an object, a quoted string or a number: it must be JSON; bare words like fp16 or runs/x stay strings
        if raw.lstrip()[:1] in ("[", "{", '"') or raw.strip().lstrip("-").isdigit():
            raise
        return key, raw


def _nesting(value):
    """How deep lists and dicts nest in `value` (0 for a number or a string), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (list, dict)):
            if depth + 1 > MAX_NESTING:
                return depth + 1  # deep enough to refuse: no need to walk the rest
            deepest = max(deepest, depth + 1)
            stack += [(x, depth + 1) for x in (v.values() if isinstance(v, dict) else v)]
    return deepest


def nest(dotted, value):
    """'a.b' , v -> {'a': {'b': v}}."""
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def merge(base, update, source, prefix=""):
    """Deep-merge `update` into `base` in place; unknown keys are refused here, by name."""
    if not isinstance(update, dict):
        raise UserError(f"{source}: {prefix.rstrip('.') or 'params'} must be a JSON object, got {update!r}.")
    for key, value in update.items():
        name = prefix + key
        if key == DOC_KEY:
            if not isinstance(value, str):
                raise UserError(f"{source}: {name} must be a string (a free-text note).")
            continue
        if key not in base:
            raise UserError(_unknown_key(name, list(base), source))
        if isinstance(base[key], dict):
            merge(base[key], value, source, name + ".")
        elif _nesting(value) > 1:
            raise UserError(f"{source}: params key {name} holds lists or objects inside one another; "
                            f"a value is a number, a string, true/false/null or a flat list.")
        else:
            base[key] = copy.deepcopy(value)


def _unknown_key(name, valid, source):
    """'params key data.batch_size ... did you mean train.batch_size?' plus the valid keys."""
    leaf = name.rsplit(".", 1)[-1]
    everywhere = {k: f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys}  # each key's name is one section's
    # the same key in another section is the likeliest mistake, then another tool's name for a key, then a
    # typo of a key here, then a typo of a key elsewhere
    target = everywhere.get(leaf) or everywhere.get(ALIASES.get(leaf.lower()))
    if target is None:
        close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
        if close:
            target = (name.rsplit(".", 1)[0] + "." if "." in name else "") + close[0]
        else:
            close = difflib.get_close_matches(leaf, list(everywhere), n=1, cutoff=0.75)
            target = everywhere[close[0]] if close else None
    hint = f" did you mean {target}?" if target else ""
    return f"{source}: params key {name} is not known;{hint} valid keys here: {', '.join(valid)}."


def validate(params: dict) -> None:
    """Types, ranges and cross-field rules; raises UserError on the first problem."""
    check_leaves(params, SCHEMA)
    _check_cross(params)


def check_leaves(params: dict, sections: Iterable[str]) -> None:
    """Each key's type and rule in `sections` (eval checks a run's saved data and train sections this way)."""
    for section in sections:
        for key, (_, types, rule) in SCHEMA[section].items():
            name = f"{section}.{key}"
            value = params[section][key]
            # bool is an int in Python: refuse true for a number, and 1 for a bool
            ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
            if not ok:
                raise UserError(_wrong_type(name, value, types))
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
                raise UserError(f"params key {name} has {len(str(abs(value)))} digits; use a value below 2**63.")
            # json.loads reads NaN and Infinity, and NaN slips past every bound (all comparisons are false)
            numbers = value if isinstance(value, list) else [value]
            if not all(math.isfinite(v) for v in numbers if isinstance(v, float)):
                raise UserError(f"params key {name} is {json.dumps(value)}; NaN and Infinity are not allowed, use finite numbers.")
            if value is not None and rule is not None:
                _check_rule(name, value, rule)


def _wrong_type(name, value, types):
    """The sentence for a value of the wrong type; a number written as a string gets the number it meant."""
    message = f"params key {name} must be {_type_names(types)}, got {json.dumps(value)[:80]}"
    if isinstance(value, str) and float in _as_tuple(types):
        try:
            return f"{message}, a string; write the number without quotes: {float(value):g}."
        except ValueError:
            pass
    return message + "."


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _type_names(types):
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in _as_tuple(types)))


def _all_numbers(values):
    """Every item an int or float (bool is an int in Python, but true is not a number here)."""
    return all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in values)


def _check_rule(name, value, rule):
    """One leaf's rule from SCHEMA."""
    if isinstance(rule, tuple):
        if value not in rule:  # the type check already told bools from ints
            raise UserError(f"params key {name} is {json.dumps(value)}; choose one of {json.dumps(list(rule))}.")
        return
    bounds = {
        ">0": (lambda v: v > 0, "greater than 0"),
        ">=0": (lambda v: v >= 0, "0 or more"),
        "(0,1)": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
        "[0,1]": (lambda v: 0 <= v <= 1, "between 0 and 1"),
        "[0,1)": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
        "(0,4096]": (lambda v: 0 < v <= 4096, "between 1 and 4096"),
        "[0.01,1]": (lambda v: 0.01 <= v <= 1, "at least 0.01 and at most 1"),
        "minutes": (lambda v: 0 < v <= MAX_BUDGET_MIN, f"greater than 0 and at most {MAX_BUDGET_MIN:,} (minutes)"),
        "alpha": (lambda v: v == 0 or ALPHA[0] <= v <= ALPHA[1], f"0 (off) or between {ALPHA[0]} and {ALPHA[1]}"),
    }
    if rule in bounds:
        test, words = bounds[rule]
        if not test(value):
            raise UserError(f"params key {name} is {json.dumps(value)}; it must be {words}.")
    elif rule == "path":
        problem = path_problem(value)
        if problem == "is empty":
            raise UserError(f"params key {name} is empty; set it to a path, e.g. \"runs/my_run\".")
        if problem is not None:
            raise UserError(f"params key {name} is {json.dumps(value)[:60]}, which {problem}; use a plain path.")
    elif rule == "floats":
        if not value or not _all_numbers(value):
            raise UserError(f"params key {name} must be a non-empty list of numbers, got {json.dumps(value)}.")
    elif rule == "scale":
        if len(value) != 2 or not _all_numbers(value) or not 0 < value[0] <= value[1] <= 1:
            raise UserError(f"params key {name} must be [lo, hi] with 0 < lo <= hi <= 1, got {json.dumps(value)}.")
    elif rule == "preset":
        if not PRESET_RE.fullmatch(value.strip()):
            raise UserError(
                f"params key {name} is {value!r}, not a known preset; use a size from {', '.join(PRESETS)} and a "
                f"positive patch size, e.g. \"B/16\" or \"S/4\", or null with explicit sizes."
            )
    elif rule == "shards":
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise UserError(f"params key {name} must be a brace pattern or a list of paths, got {json.dumps(value)[:80]}.")
        for path in value if isinstance(value, list) else [value]:
            _check_rule(name, path, "path")
    elif rule == "randaugment":
        if not re.fullmatch(r"rand(-[a-z]+[\d.]*)*", value):
            raise UserError(
                f"params key {name} is {value!r}; use a timm RandAugment string such as \"rand-m9-mstd0.5\" or null."
            )
    else:
        raise AssertionError(f"unknown rule {rule!r} for {name}")


def _check_cross(params):
    """Rules between keys: what no single leaf can see."""
    m, d, t = params["model"], params["data"], params["train"]
    for key in ("mean", "std"):
        if len(d[key]) != d["channels"]:
            raise UserError(
                f"params key data.{key} has {len(d[key])} values but data.channels is {d['channels']}; "
                f"give one value per channel."
            )
    if any(v <= 0 for v in d["std"]):
        raise UserError(f"params key data.std must be positive, got {d['std']}.")
    if t["randaugment"]:  # built and tried now: timm parses strings it cannot run
        from vit.data.transforms import rand_augment

        rand_augment(t["randaugment"], d["image_size"], d["channels"], d["mean"])
    if m["pretrained"] is not None:
        given = [k for k in FROM_SCRATCH if m[k] is not None] + (["preset"] if m["preset"] else [])
        if given:
            raise UserError(
                f"params key model.{given[0]} is set but model.pretrained decides the architecture; "
                f"set model.{given[0]} to null."
            )
    elif m["preset"] is None:
        missing = [k for k in SIZES if m[k] is None]
        if missing:
            raise UserError(f"params keys model.{', model.'.join(missing)} are null but there is no model.preset or "
                            f"model.pretrained to take them from; set them or choose a preset such as \"S/16\".")
    patch = m["patch_size"] or (int(PRESET_RE.fullmatch(m["preset"].strip()).group(2)) if m["preset"] else None)
    if patch is not None and d["image_size"] % patch:
        raise UserError(f"params key data.image_size={d['image_size']} is not divisible by the patch size {patch}; "
                        f"use a multiple of {patch}.")
    if m["hidden_size"] and m["num_attention_heads"] and m["hidden_size"] % m["num_attention_heads"]:
        raise UserError(f"params key model.num_attention_heads={m['num_attention_heads']} does not divide "
                        f"model.hidden_size={m['hidden_size']}; choose a head count that divides it.")
    if d["dataset"] == "webdataset" and not d["train_shards"]:
        raise UserError("params key data.train_shards is empty but data.dataset is \"webdataset\"; set it to the train "
                        "shards (a brace pattern or a list of paths; `vit shards` writes them and prints the lines).")
    if t["strategy"] == "fsdp" and t["ema_decay"] is not None:
        raise UserError("params key train.ema_decay is set but train.strategy is \"fsdp\", whose sharded weights the EMA "
                        "(an unsharded copy) cannot follow; set train.ema_decay to null or train.strategy to \"ddp\".")
    if d["dataset"] == "folder" and not d["train_dir"]:
        raise UserError("params key data.train_dir is null but data.dataset is \"folder\"; set it to the train folder.")
    if t["min_lr"] > t["lr"]:
        raise UserError(f"params key train.min_lr={t['min_lr']} is above train.lr={t['lr']}; lower it.")
    if params["output"]["best_metric"] == "val_acc_ema" and t["ema_decay"] is None:
        raise UserError("params key output.best_metric is \"val_acc_ema\" but train.ema_decay is null, so there is no EMA; "
                        "set train.ema_decay (e.g. 0.9998) or output.best_metric to \"val_acc\".")
    if t["cache_features"]:
        _check_cache(t, d)
    if m["pretrained_ema"] and m["pretrained"] is None:
        raise UserError("params key model.pretrained_ema is true but model.pretrained is null; set model.pretrained or drop model.pretrained_ema.")
    if m["pretrained"] is None:  # sizes no memory holds stop here, before anything is allocated (a checkpoint: vit/factory.py)
        check_fits(architecture(params, num_labels=2), params, "the model params describe")


def architecture(params: dict, **fields) -> ViTConfig:
    """The ViTConfig of the model trained from scratch that `params` describes (a preset and/or explicit
    sizes, at data.image_size and data.channels), with `fields` added (num_labels, id2label, dropout, ...)."""
    m, d = params["model"], params["data"]
    kw = {"image_size": d["image_size"], "num_channels": d["channels"], **{k: m[k] for k in FROM_SCRATCH if m[k] is not None}, **fields}
    if m["preset"] is not None:
        return ViTConfig.from_preset(m["preset"], **kw)
    return ViTConfig(**{"layer_norm_eps": 1e-6, **kw})


def check_fits(config: ViTConfig, params: dict, what: str) -> None:
    """Refuse, naming it as `what`, a model that cannot train on this machine at train.batch_size (see config.check_memory)."""
    t = params["train"]
    check_memory(config, what, "choose smaller model sizes, data.image_size or train.batch_size", t["batch_size"],
                 1 if t["grad_checkpointing"] or t["freeze_backbone"] else None)  # activations kept for one block at a time


def _check_cache(t, d):
    """train.cache_features: a frozen backbone, one view per image (no augmentation), images read back in order."""
    if not t["freeze_backbone"]:
        raise UserError("params key train.cache_features is true but train.freeze_backbone is false, and only a frozen "
                        "backbone gives the same features every epoch; set train.freeze_backbone to true or "
                        "train.cache_features to false.")
    on = {k: t[k] for k, off in AUGMENTATION_OFF.items() if t[k] != off}
    if on:
        now = ", ".join(f"train.{k}={json.dumps(v)}" for k, v in on.items())
        want = ", ".join(f"train.{k}={json.dumps(AUGMENTATION_OFF[k])}" for k in on)
        raise UserError(f"params key train.cache_features caches one view of each image, so augmentation cannot apply "
                        f"({now}); set {want}, or train.cache_features to false.")
    for key, value, why in (("data.dataset", "webdataset", "streamed shards cannot be read in index order for the extraction"),
                            ("train.strategy", "fsdp", "the cached probe trains the head alone, which needs no sharding")):
        if {"data.dataset": d["dataset"], "train.strategy": t["strategy"]}[key] == value:
            raise UserError(f"params key train.cache_features is true but {key} is \"{value}\", and {why}; "
                            f"set train.cache_features to false.")


def save(params: dict, path: str) -> None:
    """The resolved params, as the run folder's params.json."""
    with open(path, "w") as f:
        json.dump(params, f, indent=2)
        f.write("\n")
