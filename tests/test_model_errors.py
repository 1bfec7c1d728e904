"""Every user mistake gives one UserError sentence with the right words; hostile files run no code."""

import builtins
import json

import numpy as np
import pytest
import torch
from google_npz import timm_vit, write_npz
from safetensors.torch import save_file

from vit import UserError, ViTConfig, ViTForImageClassification, ViTModel


def raises(words, fn, *args, **kw):
    """Call fn, expect a one-line UserError containing every one of `words`."""
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("err")
    model = timm_vit(width=32, depth=1, heads=4, image_size=16, patch=8, classes=3)
    torch.save(model.state_dict(), root / "vit.pth")
    return model, root / "vit.pth"


def load(path, **kw):
    return ViTForImageClassification.from_pretrained(path, **kw)


def test_missing_file(tmp_path):
    raises(["nope.pth", "does not exist"], load, tmp_path / "nope.pth")


def test_folder_without_config_or_weights(tmp_path):
    raises(["no config.json"], load, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ViTConfig(hidden_size=32, num_attention_heads=4).to_hf_dict()))
    raises(["no model.safetensors or pytorch_model.bin"], load, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    raises(["config.json", "not valid JSON"], load, tmp_path)


def test_unrecognised_format(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    raises(["weights.txt", "unrecognised format"], load, tmp_path / "weights.txt")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pth")
    raises(["other.pth", "not a recognised ViT state dict"], load, tmp_path / "other.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    raises(["list.pth", "not a state dict"], load, tmp_path / "list.pth")
    np.savez(tmp_path / "other.npz", w=np.zeros(3, dtype=np.float32))
    raises(["other.npz", "not a recognised Google ViT .npz"], load, tmp_path / "other.npz")


def test_unsupported_variant_key_is_refused_not_dropped(timm_file, tmp_path):
    state = dict(torch.load(timm_file[1], weights_only=True), **{"blocks.0.attn.q_norm.weight": torch.ones(8)})
    torch.save(state, tmp_path / "qknorm.pth")
    raises(["qknorm.pth", "'blocks.0.attn.q_norm.weight'", "qk-norm", "no counterpart"], load, tmp_path / "qknorm.pth", num_attention_heads=4)
    state = dict(torch.load(timm_file[1], weights_only=True), **{"blocks.0.attn.extra": torch.ones(8)})
    torch.save(state, tmp_path / "other.pth")
    raises(["other.pth", "'blocks.0.attn.extra'", "no counterpart"], load, tmp_path / "other.pth", num_attention_heads=4)


@pytest.mark.parametrize("name", ["vit.pth", "vit.safetensors", "vit.npz"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_files_name_the_file(timm_file, tmp_path, name, damage):
    model, _ = timm_file
    path = tmp_path / name
    if name.endswith(".npz"):
        write_npz(path, model.state_dict(), 4)
    elif name.endswith(".safetensors"):
        save_file(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 8)
    raises([str(path)], load, path, num_attention_heads=4)


def test_shape_mismatch_names_key_and_shapes(timm_file):
    raises(["'vit.encoder.layer.0.intermediate.dense.weight'", "(128, 32)", "(48, 32)"], load, timm_file[1], num_attention_heads=4, intermediate_size=48)
    raises(["'vit.embeddings.cls_token'", "(1, 1, 32)", "(1, 1, 48)"], load, timm_file[1], num_attention_heads=4, hidden_size=48)
    raises(["3 input channels", "cannot be adapted to 2", "num_channels=3 or 1"], load, timm_file[1], num_attention_heads=4, num_channels=2)


def test_heads_must_divide_width(timm_file):
    raises(["num_attention_heads=5", "hidden_size=32"], load, timm_file[1], num_attention_heads=5)
    raises(["num_attention_heads=5"], ViTConfig, hidden_size=32, num_attention_heads=5)


def test_nonstandard_width_needs_heads(timm_file):
    raises(["width 32", "num_attention_heads"], load, timm_file[1])


def test_image_size_not_divisible_by_patch(timm_file):
    raises(["image_size=30", "patch_size=8"], load, timm_file[1], num_attention_heads=4, image_size=30)
    model = ViTModel(ViTConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, image_size=16, patch_size=8))
    raises(["20x20", "patch_size=8"], model, torch.zeros(1, 3, 20, 20), interpolate_pos_encoding=True)
    raises(["24x24", "image_size=16"], model, torch.zeros(1, 3, 24, 24))


def test_wrong_channel_count():
    model = ViTModel(ViTConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, image_size=16, patch_size=8))
    raises(["1 channels", "num_channels=3"], model, torch.zeros(1, 1, 16, 16))


def test_bad_overrides(timm_file):
    raises(["unknown config override", "hiden_size"], load, timm_file[1], hiden_size=32)
    raises(["patch_size=0", "positive integer"], ViTConfig, patch_size=0)
    raises(["hidden_act='swish'", "gelu"], ViTConfig, hidden_act="swish")


def test_every_activation_the_config_accepts_builds():
    """vit.config lists the activation names without torch; vit.model maps each to a module."""
    from vit.config import ACTIVATIONS
    from vit.layers import ACT2FN

    assert sorted(ACT2FN) == sorted(ACTIVATIONS)
    for act in ACTIVATIONS:
        ViTModel(ViTConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8,
                           image_size=8, patch_size=4, hidden_act=act))


class Evil:
    """Pickles to a call that writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("where", ["file.pth", "folder/pytorch_model.bin", "file.npz"])
def test_pickle_that_runs_code_is_refused(timm_file, tmp_path, where):
    marker = tmp_path / "marker"
    path = tmp_path / where
    path.parent.mkdir(exist_ok=True)
    if where.endswith(".npz"):
        np.savez(path, **{"embedding/kernel": np.array([Evil(marker)], dtype=object)})
        words = [str(path), "corrupt, truncated or pickled"]
    else:
        torch.save({**torch.load(timm_file[1], weights_only=True), "evil": Evil(marker)}, path)
        words = [str(path), "could run code"]
        if "folder" in where:
            (path.parent / "config.json").write_text(json.dumps(ViTConfig(hidden_size=32, num_attention_heads=4).to_hf_dict()))
            path = path.parent
    raises(words, load, path, num_attention_heads=4)
    assert not marker.exists(), "the pickle ran code"


def test_broken_shard_index_and_processor_config_are_named(tmp_path):
    from vit.factory import load_model

    folder = tmp_path / "hf"
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                         image_size=16, patch_size=8, num_labels=3)).save_pretrained(folder)
    index = folder / "model.safetensors.index.json"
    index.write_text("{")
    raises([str(index), "not valid"], load, folder)
    index.write_text(json.dumps({"weight_map": {"vit.embeddings.cls_token": "model-00002-of-00002.safetensors"}}))
    raises([str(folder), "model-00002-of-00002.safetensors", "copy the whole model folder"], load, folder)
    index.unlink()
    (folder / "preprocessor_config.json").write_text("{")
    raises(["preprocessor_config.json", "not valid JSON"], load_model, str(folder), "cpu")
