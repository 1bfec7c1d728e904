"""Hostile files a user may pass by mistake or by malice, beyond damaged bytes (test_faults_checkpoints.py):

- special files: a FIFO, a socket, /dev/zero or /dev/null (also behind a .pt symlink) as a checkpoint,
  inside an HF or run folder, as model.pretrained, as --resume's last.pt, as --params, as an image;
  opening a FIFO waits for a writer forever, so each must be refused from os.stat, naming the path;
- values inside foreign files: config.json / preprocessor_config.json fields and this project's own
  .pt (config, mean/std, params, the fields --resume reads) with wrong types or ranges, and foreign
  {"model", "config"} files: each works or is one sentence, before any model is built;
- npz headers that declare more data than the member holds, or the wrong rank.

Every case runs through the library and/or `python main.py` (the forked runner), with a timeout: a hang
fails the test instead of stalling the suite, and the child's peak memory is checked.
"""

import io
import json
import os
import socket
import zipfile

import numpy as np
import pytest
import torch

import faults_util as fu
from vit import ViTForImageClassification
from vit.errors import UserError
from vit import run_folder

HANG = 60  # seconds a refusal may take through the command line before the case counts as a hang


def special(root, kind, name):
    """A FIFO, a listening Unix socket, or a symlink to /dev/zero or /dev/null at root/name."""
    path = root / name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))  # left open for the module: a socket file that a reader could connect to
        SOCKETS.append(s)
    else:
        os.symlink(f"/dev/{kind}", path)
    return path


SOCKETS = []


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_files")
    fu.tiny_model().save_pretrained(root / "good")
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(root / "img.png")
    yield root
    for s in SOCKETS:
        s.close()


# -----------------------------------------------------------------------------
# special files


def special_checkpoints(root):
    """{case: (path passed as the checkpoint, the special file its message must name)}."""
    cases = {}
    for kind, name in (("fifo", "fifo.pt"), ("fifo", "fifo.npz"), ("fifo", "fifo"), ("socket", "sock.safetensors"),
                       ("zero", "zero.pt"), ("null", "null.pth"), ("zero", "zero.npz")):
        path = special(root, kind, name)
        cases[name] = (path, path)
    for part in ("config.json", "model.safetensors", "preprocessor_config.json"):  # inside an HF folder
        folder = root / f"hf_{part}"
        fu.tiny_model().save_pretrained(folder)
        if os.path.exists(folder / part):  # save_pretrained writes no preprocessor_config.json
            os.remove(folder / part)
        cases[f"hf folder, {part} a FIFO"] = (folder, special(folder, "fifo", part))
    run = root / "run_with_fifo_best"
    run.mkdir()
    cases["run folder, best.pt a FIFO"] = (run, special(run, "fifo", run_folder.BEST))
    cases["/dev/zero itself"] = ("/dev/zero", "/dev/zero")
    return cases


@pytest.fixture(scope="module")
def checkpoints(root):
    return special_checkpoints(root)


CHECKPOINT_CASES = ["fifo.pt", "fifo.npz", "fifo", "sock.safetensors", "zero.pt", "null.pth", "zero.npz",
                    "hf folder, config.json a FIFO", "hf folder, model.safetensors a FIFO",
                    "hf folder, preprocessor_config.json a FIFO", "run folder, best.pt a FIFO", "/dev/zero itself"]


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_special_file_as_a_checkpoint_is_refused_at_once(root, checkpoints, tmp_path, name):
    path, named = (str(p) for p in checkpoints[name])
    with fu.deadline(HANG), pytest.raises(UserError) as e:
        ViTForImageClassification.from_pretrained(path)
    assert named in str(e.value), str(e.value)
    r = fu.run(["predict", "--checkpoint", path, str(root / "img.png")], tmp_path, timeout=HANG)
    line = fu.assert_clean_refusal(r, named)
    assert name.startswith("/dev/zero") or any(k in line for k in ("FIFO", "socket", "device")), line
    fu.record("special", f"{name} as a checkpoint refused", 1)


@pytest.mark.parametrize("kind", ["fifo", "socket", "zero"])
def test_special_file_as_an_image_is_refused_at_once(root, tmp_path, kind):
    image = str(special(tmp_path, kind, f"{kind}.png"))
    r = fu.run(["predict", "--checkpoint", str(root / "good"), image], tmp_path, timeout=HANG)
    fu.assert_clean_refusal(r, image)
    r = fu.run(["attention", "--checkpoint", str(root / "good"), image, "--out", str(tmp_path / "att")], tmp_path, timeout=HANG)
    fu.assert_clean_refusal(r, image)
    fu.record("special", f"a {kind} as an image to predict and attention refused", 2)


def test_special_files_inside_an_image_folder_are_left_out(root, tmp_path):
    """predict on a folder, eval --data-dir and inspect --data-dir walk past FIFOs and sockets."""
    data = tmp_path / "data"
    fu.make_folder(data)
    for c in ("class_0", "class_1"):
        special(data / c, "fifo", "stuck.png")
    special(data / "class_2", "socket", "sock.jpg")
    ckpt = str(root / "good")
    folder = data / "class_0"
    r = fu.run(["predict", "--checkpoint", ckpt, str(folder)], tmp_path, timeout=HANG)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len([line for line in r.stdout.splitlines() if line.startswith(str(folder))]) == 16  # its 16 PNGs
    model = fu.tiny_model(id2label={0: "class_0", 1: "class_1", 2: "class_2"})
    model.save_pretrained(tmp_path / "classes")
    r = fu.run(["eval", "--checkpoint", str(tmp_path / "classes"), "--data-dir", str(data), "--workers", "0"], tmp_path, timeout=HANG)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = fu.run(["inspect", "--checkpoint", ckpt, "--data-dir", str(data), "--out", str(tmp_path / "fig7")], tmp_path, timeout=HANG)
    assert r.returncode == 0 and "attention distance averaged over" in r.stdout, r.stderr[-2000:]
    fu.record("special", "FIFOs and sockets inside folders walked past (predict, eval, inspect)", 3)


def test_special_file_as_params_pretrained_or_last_pt_is_refused(root, tmp_path):
    data = tmp_path / "data"
    fu.make_folder(data)
    fifo = str(special(tmp_path, "fifo", "params.json"))
    r = fu.run(["--params", fifo], tmp_path, timeout=HANG)
    fu.assert_clean_refusal(r, fifo)
    params = fu.tiny_params(data, tmp_path / "run", epochs=1)
    pretrained = str(special(tmp_path, "fifo", "weights.pth"))
    sizes = ["model.patch_size=null", "model.hidden_size=null", "model.num_hidden_layers=null",
             "model.num_attention_heads=null", "model.intermediate_size=null"]
    path = fu.write_params(tmp_path / "p.json", params)
    r = fu.run(["--params", path, "--set", f"model.pretrained={pretrained}", *sizes], tmp_path, timeout=HANG)
    fu.assert_clean_refusal(r, pretrained)
    (tmp_path / "run").mkdir()
    last = str(special(tmp_path / "run", "fifo", run_folder.LAST))
    r = fu.run(["--params", path, "--resume"], tmp_path, timeout=HANG)
    fu.assert_clean_refusal(r, last, "FIFO")
    r = fu.run(["--params", path], tmp_path, timeout=HANG)  # a plain start must not take the FIFO for no run at all
    fu.assert_clean_refusal(r, last, "FIFO")
    fu.record("special", "FIFOs as --params, model.pretrained and last.pt (resume and fresh start) refused", 4)


# -----------------------------------------------------------------------------
# values inside foreign files


def hf_with(root, name, config=None, preprocessor=None):
    """The good HF folder with config.json keys (and preprocessor_config.json) changed."""
    folder = root / name
    fu.tiny_model().save_pretrained(folder)
    if config is not None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config)
        (folder / "config.json").write_text(json.dumps(cfg))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


# each refused with one sentence naming the file and the key (or the words given)
HF_CONFIGS = {
    "hidden_dropout_prob 5": {"hidden_dropout_prob": 5},
    "hidden_dropout_prob true": {"hidden_dropout_prob": True},
    "attention_probs_dropout_prob 1.0": {"attention_probs_dropout_prob": 1.0},
    "attention_probs_dropout_prob -0.1": {"attention_probs_dropout_prob": -0.1},
    "layer_norm_eps x": {"layer_norm_eps": "x"},
    "layer_norm_eps 0": {"layer_norm_eps": 0},
    "layer_norm_eps null": {"layer_norm_eps": None},
    "initializer_range x": {"initializer_range": "x"},
    "initializer_range -1": {"initializer_range": -1},
    "qkv_bias yes": {"qkv_bias": "yes"},
    "hidden_act 3": {"hidden_act": 3},
    "hidden_act list": {"hidden_act": ["gelu"]},
    "image_size string": {"image_size": "16"},
    "id2label a list": {"id2label": ["a", "b", "c"]},
    "id2label gaps": {"id2label": {"0": "a", "1": "b", "5": "c"}},
    "id2label words": {"id2label": {"x": "a", "y": "b", "z": "c"}},
    "num_hidden_layers 10**9": {"num_hidden_layers": 10**9},
    "hidden_size 10**9": {"hidden_size": 10**9},
}
PREPROCESSORS = {  # (preprocessor_config.json, works?)
    "image_mean a string": ({"image_mean": "xyz", "image_std": [0.5] * 3}, False),
    "image_mean a dict": ({"image_mean": {"r": 0.5}, "image_std": [0.5] * 3}, False),
    "image_std 0": ({"image_mean": [0.5] * 3, "image_std": [0.5, 0, 0.5]}, False),
    "image_mean two values for three channels": ({"image_mean": [0.5, 0.5], "image_std": [0.5, 0.5]}, False),
    "image_mean booleans": ({"image_mean": [True] * 3, "image_std": [0.5] * 3}, False),
    "image_mean one number (HF broadcasts it)": ({"image_mean": 5, "image_std": 0.5}, True),
    "not an object": ([1, 2, 3], True),  # no normalization stated: 0.5/0.5, said out loud
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_config_json_values_are_checked_before_the_model_is_built(tmp_path, name):
    folder = hf_with(tmp_path, "hf", config=HF_CONFIGS[name])
    key = next(iter(HF_CONFIGS[name]))
    with pytest.raises(UserError) as e:
        ViTForImageClassification.from_pretrained(folder)
    message = str(e.value)
    assert str(folder) in message and key in message and "\n" not in message, message
    fu.record("values", f"config.json {name} refused", 1)


def test_hf_config_values_through_predict(root, tmp_path):
    """A few of them through the command line: exit 2, one sentence, and no model of 10**9 layers built."""
    for name in ("layer_norm_eps x", "hidden_dropout_prob 5", "num_hidden_layers 10**9", "id2label gaps"):
        folder = hf_with(tmp_path, name.replace(" ", "_"), config=HF_CONFIGS[name])
        r = fu.run(["predict", "--checkpoint", str(folder), str(root / "img.png")], tmp_path, timeout=HANG)
        fu.assert_clean_refusal(r, str(folder))
    fu.record("values", "config.json values refused through predict", 4)


@pytest.mark.parametrize("name", list(PREPROCESSORS))
def test_preprocessor_config_values_work_or_are_refused(root, tmp_path, name):
    pre, works = PREPROCESSORS[name]
    folder = hf_with(tmp_path, "hf", preprocessor=pre)
    r = fu.run(["predict", "--checkpoint", str(folder), str(root / "img.png")], tmp_path, timeout=HANG)
    if works:
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "img.png: " in r.stdout
    else:
        fu.assert_clean_refusal(r, str(folder))
    fu.record("values", f"preprocessor_config.json {name} {'works' if works else 'refused'}", 1)


def training_pt(model, **changes):
    """A best.pt as this project writes it (model, config, classes, mean/std, params), with keys changed
    (a value of None deletes the key)."""
    obj = {"model": model.state_dict(), "config": model.config.to_hf_dict(), "classes": ["a", "b", "c"],
           "mean": [0.5] * 3, "std": [0.25] * 3, "params": {"data": {"image_size": 16}, "train": {"batch_size": 8}}}
    for k, v in changes.items():
        if v is None:
            obj.pop(k)
        else:
            obj[k] = v
    return obj


def own_pt_cases():
    """{case: (changes to training_pt, works?)}."""
    config = fu.tiny_model().config.to_hf_dict()
    return {
        "config hidden_size a string": ({"config": {**config, "hidden_size": "32"}}, False),
        "config layer_norm_eps x": ({"config": {**config, "layer_norm_eps": "x"}}, False),
        "config num_hidden_layers 10**9": ({"config": {**config, "num_hidden_layers": 10**9}}, False),
        "config id2label a string": ({"config": {**config, "id2label": "abc"}}, False),
        "mean a string": ({"mean": "xyz"}, False),
        "mean NaN": ({"mean": [float("nan")] * 3}, False),
        "std zeros": ({"std": [0.0] * 3}, False),
        "mean two values": ({"mean": [0.5, 0.5], "std": [0.5, 0.5]}, False),
        "params a string": ({"params": "x"}, False),
        "params sections not objects": ({"params": {"data": 5}}, False),
        "classes a number": ({"classes": 5}, False),
        "classes one name too few": ({"classes": ["a", "b"]}, False),
        "no mean or std": ({"mean": None, "std": None}, True),
    }


@pytest.mark.parametrize("name", list(own_pt_cases()))
def test_this_projects_pt_with_wrong_values_works_or_is_refused(root, tmp_path, name):
    changes, works = own_pt_cases()[name]
    path = tmp_path / "best.pt"
    torch.save(training_pt(fu.tiny_model(), **changes), path)
    r = fu.run(["predict", "--checkpoint", str(path), str(root / "img.png")], tmp_path, timeout=HANG)
    if works:
        assert r.returncode == 0 and "img.png: " in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
    else:
        fu.assert_clean_refusal(r, str(path))
    fu.record("values", f"own .pt with {name} {'works' if works else 'refused'}", 1)


def test_eval_refuses_a_pt_whose_saved_params_are_wrong_typed(root, tmp_path):
    path = tmp_path / "best.pt"
    torch.save(training_pt(fu.tiny_model(), params={"data": {"workers": "many"}, "train": {}}), path)
    r = fu.run(["eval", "--checkpoint", str(path)], tmp_path, timeout=HANG)
    fu.assert_clean_refusal(r, str(path), "data.workers")
    fu.record("values", "eval of a .pt whose saved params hold data.workers='many' refused", 1)


def test_foreign_model_config_pt_files_are_read_by_their_shapes(root, tmp_path):
    """{"model": ..., "config": ...} written by someone else's training script: its config is the
    script's arguments, not a ViT config, so the weights are read by their shapes (timm's and HF's names)."""
    import timm

    args = {"lr": 0.1, "epochs": 300, "arch": "vit_tiny"}
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1, num_classes=3)
    torch.save({"model": ref.state_dict(), "config": args}, tmp_path / "timm_named.pt")
    hf = fu.tiny_model(hidden_size=192, num_attention_heads=3, intermediate_size=64)  # 192: a standard width, heads known
    torch.save({"model": hf.state_dict(), "config": args, "epoch": 300}, tmp_path / "hf_named.pt")
    for name in ("timm_named.pt", "hf_named.pt"):
        r = fu.run(["predict", "--checkpoint", str(tmp_path / name), str(root / "img.png")], tmp_path, timeout=HANG)
        assert r.returncode == 0 and "img.png: " in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
    fu.record("values", "foreign {model, config} .pt files (timm and HF names) read by their shapes", 2)


# -----------------------------------------------------------------------------
# what --resume reads from last.pt


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return fu.finished_run(tmp_path_factory.mktemp("faults_finished"))


def last_pt_cases():
    return {
        "without optimizer": {"optimizer": None},
        "without scaler": {"scaler": None},
        "epoch a string": {"epoch": "1"},
        "epoch negative": {"epoch": -1},
        "epoch true": {"epoch": True},
        "scheduler without step": {"scheduler": {}},
        "no RNG states": {"rng": []},
        "history a string": {"history": "x"},
        "history of numbers": {"history": [1, 2]},
        "sums a dict": {"sums": {"loss": 0}},
        "plan a string": {"plan": "14 epochs"},
        "plan epochs a string": {"plan": {"epochs": "14", "budget_s": 900.0, "decided": True, "totals": [[0, 10]], "notes": []}},
        "plan totals empty": {"plan": {"epochs": 14, "budget_s": 900.0, "decided": True, "totals": [], "notes": []}},
        "plan budget NaN": {"plan": {"epochs": 14, "budget_s": float("nan"), "decided": True, "totals": [[0, 10]], "notes": []}},
        "plan drop share 0": {"plan": {"epochs": 14, "budget_s": 900.0, "decided": True, "totals": [[0, 10]], "notes": [],
                                       "drop_share": 0.0}},
    }


@pytest.mark.parametrize("name", list(last_pt_cases()))
def test_resume_refuses_a_last_pt_without_what_it_reads(finished_run, tmp_path, name):
    def damage(ckpt):
        for k, v in last_pt_cases()[name].items():
            if v is None:
                ckpt.pop(k)
            else:
                ckpt[k] = v

    params = fu.copy_run(finished_run, tmp_path, damage)
    r = fu.run(["--params", params, "--resume"], tmp_path, timeout=HANG)
    fu.assert_clean_refusal(r, str(tmp_path / "run" / run_folder.LAST), "cannot continue")
    fu.record("values", f"last.pt {name} refused by --resume", 1)


# -----------------------------------------------------------------------------
# npz headers


def npy_member(shape, dtype="<f4", data=b"\0" * 64, version=(1, 0)):
    """An .npy member's bytes whose header declares `shape` and `dtype`, followed by `data` (any length)."""
    buf = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buf, header)
    else:
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue() + data


def real_npz_arrays():
    """A loadable tiny Google-format npz's arrays: width 32, 2 heads, 2 blocks, 16x16 images in 4x4 patches."""
    from google_npz import timm_vit, to_google

    return to_google(timm_vit(width=32, depth=2, heads=2, image_size=16, patch=4, classes=3).state_dict(), num_heads=2)


def write_npz(path, arrays, raw=None, compress=False):
    """np.savez's layout: one .npy member per array; `raw` {name: bytes} members written as given."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(v), allow_pickle=False)
            z.writestr(k + ".npy", buf.getvalue())
        for k, blob in (raw or {}).items():
            z.writestr(k + ".npy", blob)
    return path


def npz_cases(root):
    arrays = {k: np.asarray(v) for k, v in real_npz_arrays().items()}
    kernel = "embedding/kernel"
    block = next(k for k in arrays if k.startswith("Transformer/encoderblock_0/") and k.endswith("query/kernel"))
    without = lambda *names: {k: v for k, v in arrays.items() if k not in names}  # noqa: E731
    cases = {
        "1e12 floats declared, 64 bytes held": write_npz(root / "huge.npz", without(kernel), {kernel: npy_member((10**6, 10**6))}),
        "a block kernel declaring 2x its bytes": write_npz(root / "double.npz", without(block),
                                                           {block: npy_member(arrays[block].shape[:-1] + (arrays[block].shape[-1] * 2,),
                                                                              data=arrays[block].astype("<f4").tobytes())}),
        "fewer bytes than declared, header v2": write_npz(root / "short_v2.npz", without(kernel),
                                                          {kernel: npy_member(arrays[kernel].shape, data=b"\0" * 8, version=(2, 0))}),
        "object dtype": write_npz(root / "object.npz", without(kernel), {kernel: npy_member((2,), dtype="|O", data=b"")}),
        "npy format 3.0": write_npz(root / "v3.npz", without(kernel), {kernel: b"\x93NUMPY\x03\x00" + b"\0" * 60}),
        "1-D embedding/kernel": write_npz(root / "flat_kernel.npz", {**arrays, kernel: arrays[kernel].reshape(-1)}),
        "0-d cls": write_npz(root / "scalar_cls.npz", {**arrays, "cls": np.float32(1.0)}),
        "1-D position embeddings": write_npz(root / "flat_pos.npz", {**arrays, "Transformer/posembed_input/pos_embedding":
                                                                   arrays["Transformer/posembed_input/pos_embedding"].reshape(-1)}),
        "2-D query kernel": write_npz(root / "flat_query.npz", {**arrays, block: arrays[block].reshape(arrays[block].shape[0], -1)}),
        "0-d scanned block array": write_npz(root / "scanned_scalar.npz", {**arrays, "Transformer/encoderblock/LayerNorm_0/scale": np.float32(1)}),
        "position embeddings for no tokens": write_npz(root / "no_tokens.npz", {**without("cls"), "Transformer/posembed_input/pos_embedding":
                                                                             np.zeros((1, 0, 32), np.float32)}),
        "a plain .npy named .npz": root / "plain.npz",
    }
    np.save(root / "plain.npy", arrays[kernel])
    os.replace(root / "plain.npy", root / "plain.npz")
    blob = bytearray((write_npz(root / "compressed_src.npz", arrays, compress=True)).read_bytes())
    blob[len(blob) // 3] ^= 0xFF  # inside a deflated member's data
    (root / "compressed_flipped.npz").write_bytes(bytes(blob))
    cases["a flipped byte in deflated data"] = root / "compressed_flipped.npz"
    return cases


@pytest.fixture(scope="module")
def npzs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_npz")
    return npz_cases(root)


NPZ_CASES = ["1e12 floats declared, 64 bytes held", "a block kernel declaring 2x its bytes", "fewer bytes than declared, header v2",
             "object dtype", "npy format 3.0", "1-D embedding/kernel", "0-d cls", "1-D position embeddings", "2-D query kernel",
             "0-d scanned block array", "position embeddings for no tokens", "a plain .npy named .npz",
             "a flipped byte in deflated data"]


@pytest.mark.parametrize("name", NPZ_CASES)
def test_npz_headers_and_ranks_are_checked_before_reading(npzs, name):
    import tracemalloc

    path = str(npzs[name])
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as e:
            ViTForImageClassification.from_pretrained(path, num_attention_heads=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert path in message and "\n" not in message and len(message) < 600, message
    assert peak < 50 * 2**20, f"{name}: {peak / 2**20:.0f} MB allocated while refusing it"  # numpy's allocations are traced
    fu.record("npz", f"{name} refused", 1)


def test_npz_refusals_through_predict(root, npzs, tmp_path):
    for name in ("1e12 floats declared, 64 bytes held", "1-D embedding/kernel", "0-d scanned block array"):
        path = str(npzs[name])
        r = fu.run(["predict", "--checkpoint", path, str(root / "img.png")], tmp_path, timeout=HANG)
        fu.assert_clean_refusal(r, path)
    fu.record("npz", "npz refusals through predict", 3)


def test_the_untouched_npz_still_loads(tmp_path):
    """The cases above were cut from this file: it loads, so the refusals are about the damage."""
    path = write_npz(tmp_path / "good.npz", {k: np.asarray(v) for k, v in real_npz_arrays().items()})
    ViTForImageClassification.from_pretrained(str(path), num_attention_heads=2)
