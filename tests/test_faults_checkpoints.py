"""Bad checkpoints: truncated and bit-flipped safetensors / pth / npz / training .pt files, pickles that
would run code, other architectures, HF folders whose config.json contradicts the weights.

Each is refused twice: by `ViTForImageClassification.from_pretrained` (or the training-checkpoint
reader for .pt) with a UserError naming the file, and by `python main.py predict --checkpoint ...`
with one `error:` line naming the file, exit code 2 and no traceback. Code in a pickle never runs.
"""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

import faults_util as fu
from vit import ViTForImageClassification
from vit.factory import load_model
from vit.errors import UserError

MARKER = "pwned_marker"  # a file the hostile pickles try to create (in the case's folder)


tiny_model = fu.tiny_model


def torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def flip(blob, pos):
    """The bytes with every bit of the byte at `pos` flipped."""
    b = bytearray(blob)
    b[pos] ^= 0xFF
    return bytes(b)


class Hostile:
    """Unpickling this calls exec, which writes the marker file: what a malicious checkpoint does."""

    def __init__(self, folder):
        self.code = f"open({os.path.join(folder, MARKER)!r}, 'w').write('ran')"

    def __reduce__(self):
        return exec, (self.code,)


def timm_state(model):
    """Our tiny model's weights under timm's names (fused qkv), for the npz writer."""
    sd = {k.removeprefix("vit."): v for k, v in model.state_dict().items()}
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
           "head.weight": sd["classifier.weight"], "head.bias": sd["classifier.bias"]}
    for i in range(2):
        p, q = f"encoder.layer.{i}.", f"blocks.{i}."
        att = p + "attention.attention."
        for s in ("weight", "bias"):
            out[q + f"norm1.{s}"] = sd[p + f"layernorm_before.{s}"]
            out[q + f"attn.qkv.{s}"] = torch.cat([sd[att + f"{n}.{s}"] for n in ("query", "key", "value")])
            out[q + f"attn.proj.{s}"] = sd[p + f"attention.output.dense.{s}"]
            out[q + f"norm2.{s}"] = sd[p + f"layernorm_after.{s}"]
            out[q + f"mlp.fc1.{s}"] = sd[p + f"intermediate.dense.{s}"]
            out[q + f"mlp.fc2.{s}"] = sd[p + f"output.dense.{s}"]
    return out


def npz_bytes(arrays, **kw):
    buf = io.BytesIO()
    np.savez(buf, **arrays, **kw)
    return buf.getvalue()


def hf_folder(root, name, model, config_edit=None, weights=None):
    """save_pretrained, then optionally rewrite config.json keys or the weights file's bytes."""
    path = root / name
    model.save_pretrained(path)
    if config_edit is not None:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config_edit)
        (path / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        blob = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(weights(blob))
    return path


def build_cases(root):
    """{case name: (path, words the refusal must contain besides the path)}; every file is broken."""
    from google_npz import to_google

    model = tiny_model()
    sd = model.state_dict()
    (root / "good").mkdir()
    model.save_pretrained(root / "good")
    st = (root / "good" / "model.safetensors").read_bytes()
    st_header = 8 + int.from_bytes(st[:8], "little")
    pth = torch_bytes(sd)
    npz = npz_bytes(to_google({k: v for k, v in timm_state(model).items()}, num_heads=2))
    train_pt = torch_bytes({"model": sd, "config": model.config.to_hf_dict(), "classes": ["a", "b", "c"],
                            "mean": [0.5] * 3, "std": [0.5] * 3})
    files = {
        "truncated.safetensors": st[: len(st) // 2],
        "flip_length.safetensors": flip(st, 0),  # the header length
        "flip_header.safetensors": flip(st, st_header // 2),  # inside the JSON header
        "truncated.pth": pth[: len(pth) // 2],
        "flip_directory.pth": flip(pth, len(pth) - 20),  # the zip's end-of-central-directory record
        "flip_pickle.pth": flip(pth, pth.index(b"data.pkl") + 40),  # inside the pickled structure
        "truncated.npz": npz[: len(npz) // 2],
        "flip_directory.npz": flip(npz, len(npz) - 20),
        "truncated.pt": train_pt[: len(train_pt) // 2],
        "flip_directory.pt": flip(train_pt, len(train_pt) - 20),
        "resnet.pth": torch_bytes({"conv1.weight": torch.randn(8, 3, 7, 7), "bn1.weight": torch.ones(8),
                                   "bn1.running_mean": torch.zeros(8), "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3),
                                   "fc.weight": torch.randn(3, 8), "fc.bias": torch.zeros(3)}),
        "random_dict.pth": torch_bytes({"alpha": torch.randn(3), "beta": {"gamma": 1}}),
        "list.pth": torch_bytes([torch.randn(2)]),
        "layer_scale_timm.pth": torch_bytes({**timm_state(model), "blocks.0.ls1.gamma": torch.ones(32)}),
        "missing_layer.pth": torch_bytes({k: v for k, v in sd.items() if "layer.1.output" not in k}),
        "random_dict.pt": torch_bytes({"model": {"w": torch.randn(2)}, "config": {}}),
        "other_width.pt": torch_bytes({"model": sd, "config": {**model.config.to_hf_dict(), "hidden_size": 64},
                                       "classes": ["a", "b", "c"], "mean": [0.5] * 3, "std": [0.5] * 3}),
    }
    cases = {}
    for name, blob in files.items():
        (root / name).write_bytes(blob)
        cases[name] = root / name
    # pickles that would run code, in each place a loader looks
    for name in ("hostile.pth", "hostile.pt", "hostile_folder/pytorch_model.bin"):
        path = root / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(torch_bytes({"model": Hostile(path.parent), "config": {}}))
        cases[name] = path
    shutil.copy(root / "good" / "config.json", root / "hostile_folder" / "config.json")
    cases["hostile_folder/pytorch_model.bin"] = root / "hostile_folder"
    arrays = {"embedding/kernel": np.zeros((4, 4, 3, 32), np.float32), "cls": np.array([Hostile(root)], dtype=object)}
    (root / "hostile.npz").write_bytes(npz_bytes(arrays, allow_pickle=True))
    cases["hostile.npz"] = root / "hostile.npz"
    # HF folders whose config.json contradicts the weights (or is not a ViT config at all)
    for edit in ({"hidden_size": 64}, {"num_hidden_layers": 3}, {"intermediate_size": 128}, {"num_channels": 1},
                 {"patch_size": 8}, {"num_labels": 5, "id2label": {str(i): str(i) for i in range(5)}},
                 {"model_type": "bert"}):
        name = "hf_" + "_".join(f"{k}" for k in edit if k != "id2label")
        cases[name] = hf_folder(root, name, model, config_edit=edit)
    cases["hf_truncated_weights"] = hf_folder(root, "hf_truncated_weights", model, weights=lambda b: b[: len(b) // 3])
    bad_json = hf_folder(root, "hf_bad_json", model)
    (bad_json / "config.json").write_text('{"hidden_size": 32,')
    cases["hf_bad_json"] = bad_json
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return build_cases(tmp_path_factory.mktemp("faults_ckpt"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("faults_ckpt_img") / "img.png"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(path)
    return str(path)


def marker_absent(path):
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return not os.path.exists(os.path.join(folder, MARKER)) and not os.path.exists(os.path.join(os.path.dirname(folder), MARKER))


NAMES = ["truncated.safetensors", "flip_length.safetensors", "flip_header.safetensors", "truncated.pth",
         "flip_directory.pth", "flip_pickle.pth", "truncated.npz", "flip_directory.npz", "truncated.pt",
         "flip_directory.pt", "resnet.pth", "random_dict.pth", "list.pth", "layer_scale_timm.pth", "missing_layer.pth",
         "random_dict.pt", "other_width.pt", "hostile.pth", "hostile.pt", "hostile_folder/pytorch_model.bin",
         "hostile.npz", "hf_hidden_size", "hf_num_hidden_layers", "hf_intermediate_size", "hf_num_channels",
         "hf_patch_size", "hf_num_labels", "hf_model_type", "hf_truncated_weights", "hf_bad_json"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_checkpoint_is_refused_by_the_loader_and_by_predict(cases, image, tmp_path, name):
    path = str(cases[name])
    # the library: a UserError naming the file, on one line
    with pytest.raises(UserError) as e:
        if path.endswith(".pt"):
            load_model(path, torch.device("cpu"))
        else:
            ViTForImageClassification.from_pretrained(path)
    message = str(e.value)
    assert path in message and "\n" not in message and len(message) < 600, message
    assert marker_absent(path), f"{name}: unpickling ran code"
    # the command line: exit 2, one sentence naming the file, no traceback
    r = fu.run(["predict", "--checkpoint", path, image], tmp_path)
    fu.assert_clean_refusal(r, path)
    assert marker_absent(path), f"{name}: predict ran code from the pickle"
    fu.record("checkpoints", f"{name} refused (from_pretrained + predict)", 1)


def test_good_checkpoints_still_load(cases, image, tmp_path):
    """The broken files above were cut from these: they load, so the refusals are about the damage."""
    root = os.path.dirname(cases["resnet.pth"])
    ViTForImageClassification.from_pretrained(os.path.join(root, "good"))
    r = fu.run(["predict", "--checkpoint", os.path.join(root, "good"), image], tmp_path)
    assert r.returncode == 0 and "img.png: " in r.stdout, r.stderr[-3000:]


def test_real_interpreter_refuses_a_hostile_pickle(cases, image):
    """The same refusal through a fresh `python main.py` (the forked runner is vit.cli.main in a forked process)."""
    path = str(cases["hostile.pth"])
    r = fu.run_cli(["predict", "--checkpoint", path, image])
    fu.assert_clean_refusal(r, path)
    assert marker_absent(path)
