"""Each checkpoint format: built in timm or transformers with random weights, written, loaded here, compared."""

import json

import pytest
import torch
import transformers
from google_npz import randomize_, timm_vit, to_google, write_npz
from helpers import logged
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import _load_weights

from vit import ViTConfig, ViTForImageClassification, ViTModel

HEADS = 4


def max_diff(a, b):
    return (a - b).abs().max().item()


def assert_close(ours, ref, what):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = max_diff(ours, ref) / ref.abs().max().clamp_min(1e-12).item()
    assert err <= 1e-5, f"{what}: max rel diff {err:.2e}"


def hf_config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
                image_size=32, patch_size=8, num_labels=5, layer_norm_eps=1e-12)
    base.update(kw)
    return transformers.ViTConfig(**base)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """transformers' own save_pretrained of a ViTModel and of a ViTForImageClassification."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)
    id2label = {i: f"class{i}" for i in range(5)}
    models = {
        "backbone": transformers.ViTModel(hf_config()).eval(),
        "classifier": transformers.ViTForImageClassification(hf_config(id2label=id2label, label2id={v: k for k, v in id2label.items()})).eval(),
    }
    for name, m in models.items():
        randomize_(m)
        m.save_pretrained(root / name)
    return root, models


@pytest.mark.parametrize("kind", ["backbone", "classifier"])
def test_hf_folder_same_class(hf_folders, kind):
    root, models = hf_folders
    x = torch.randn(2, 3, 32, 32)
    ref = models[kind](x)
    if kind == "backbone":
        ours = ViTModel.from_pretrained(root / kind)
        out = ours(x)
        assert_close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
        assert_close(out.pooler_output, ref.pooler_output, "pooler_output")
    else:
        ours = ViTForImageClassification.from_pretrained(root / kind)
        assert_close(ours(x).logits, ref.logits, "logits")
        assert ours.config.id2label == {i: f"class{i}" for i in range(5)}
    assert ours.config.layer_norm_eps == 1e-12  # the HF config's own eps, not timm's
    assert not ours.load_report.fresh and not ours.load_report.ignored


def test_hf_backbone_folder_into_classifier_gets_fresh_head(hf_folders, caplog):
    root, models = hf_folders
    ours = ViTForImageClassification.from_pretrained(root / "backbone", num_labels=7)
    rep = ours.load_report
    assert rep.fresh == ["classifier.weight", "classifier.bias"]
    assert rep.ignored == ["vit.pooler.dense.bias", "vit.pooler.dense.weight"]
    assert "new classifier for num_labels=7" in logged(caplog)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(x).logits, torch.zeros(2, 7))  # zero-initialised head
    assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True), models["backbone"](x).last_hidden_state[:, 0], "cls features")


def test_hf_classifier_folder_into_backbone_ignores_head(hf_folders):
    root, models = hf_folders
    ours = ViTModel.from_pretrained(root / "classifier")
    rep = ours.load_report
    assert rep.ignored == ["classifier.bias", "classifier.weight"]
    assert rep.fresh == ["pooler.dense.weight", "pooler.dense.bias"]
    x = torch.randn(2, 3, 32, 32)
    ref = models["classifier"].vit(x).last_hidden_state
    assert_close(ours(x).last_hidden_state, ref, "last_hidden_state")


@pytest.mark.parametrize("layout", ["vit_prefix_bin", "bare_safetensors"])
def test_hf_folder_variants(hf_folders, tmp_path, layout):
    """pytorch_model.bin instead of safetensors; a backbone saved with the `vit.` prefix."""
    root, models = hf_folders
    state = load_file(root / "backbone" / "model.safetensors")
    (tmp_path / "config.json").write_text((root / "backbone" / "config.json").read_text())
    if layout == "vit_prefix_bin":
        torch.save({"vit." + k: v for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    else:
        save_file(state, tmp_path / "model.safetensors")
    ours = ViTModel.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    assert_close(ours(x).pooler_output, models["backbone"](x).pooler_output, "pooler_output")


@pytest.fixture(scope="module")
def timm_model():
    torch.manual_seed(2)
    return timm_vit(width=32, depth=2, heads=HEADS, image_size=32, patch=8, classes=10)


@pytest.mark.parametrize("wrap", ["bare.pth", "model.pt", "state_dict.bin", "module_prefix.pth", "orig_mod.pth", "file.safetensors"])
def test_timm_files(timm_model, tmp_path, wrap):
    state = timm_model.state_dict()
    path = tmp_path / wrap
    if wrap.endswith(".safetensors"):
        save_file(state, path)
    elif wrap.startswith("bare"):
        torch.save(state, path)
    elif wrap.startswith("module"):
        torch.save({"module." + k: v for k, v in state.items()}, path)
    elif wrap.startswith("orig_mod"):
        torch.save({"model": {"_orig_mod." + k: v for k, v in state.items()}, "epoch": 3}, path)
    else:
        torch.save({wrap.split(".")[0]: state, "optimizer": {}}, path)
    ours = ViTForImageClassification.from_pretrained(path, num_attention_heads=HEADS)
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x).logits, timm_model(x), "logits")
    assert ours.config.layer_norm_eps == 1e-6 and ours.config.num_labels == 10
    assert len(ours.load_report.mapped) == len(ours.state_dict()) and not ours.load_report.ignored


def test_timm_file_architecture_from_shapes(tmp_path):
    """A standard width (192 -> 3 heads) needs no override; depth, MLP, patch and grid come from shapes."""
    torch.manual_seed(3)
    t = timm_vit(width=192, depth=1, heads=3, image_size=24, patch=4, classes=3, mlp_ratio=2.0)
    torch.save(t.state_dict(), tmp_path / "t.pth")
    ours = ViTForImageClassification.from_pretrained(tmp_path / "t.pth")
    c = ours.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.patch_size, c.image_size) == (192, 1, 3, 384, 4, 24)
    x = torch.randn(1, 3, 24, 24)
    assert_close(ours(x).logits, t(x), "logits")


@pytest.mark.parametrize("form", ["original", "augreg", "big_vision"])
def test_npz_writer_matches_timm_loader(timm_model, tmp_path, form):
    """Our Google writer is right: timm's own _load_weights reads it back into identical tensors."""
    path = write_npz(tmp_path / f"{form}.npz", timm_model.state_dict(), HEADS, form)
    other = timm_vit(width=32, depth=2, heads=HEADS, image_size=32, patch=8, classes=10)
    _load_weights(other, str(path))
    for k, v in timm_model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), f"{form}: {k} differs by {max_diff(other.state_dict()[k], v):.2e}"


@pytest.mark.parametrize("form,kw", [("augreg", {}), ("big_vision", {}), ("big_vision", {"scan": True})])
def test_npz_forms(timm_model, tmp_path, form, kw):
    path = write_npz(tmp_path / "w.npz", timm_model.state_dict(), HEADS, form, **kw)
    ours = ViTForImageClassification.from_pretrained(path)  # heads come from the npz shapes
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x).logits, timm_model(x), "logits")
    assert ours.config.num_attention_heads == HEADS and ours.config.layer_norm_eps == 1e-6
    assert not ours.config.use_pre_logits


def test_npz_big_vision_positions_without_cls(tmp_path):
    """big_vision stores patch positions only (the cls token gets none): equal to a zero cls position."""
    torch.manual_seed(4)
    t = timm_vit(width=32, depth=1, heads=HEADS, image_size=16, patch=8, classes=3)
    with torch.no_grad():
        t.pos_embed[:, 0] = 0
    path = write_npz(tmp_path / "bv.npz", t.state_dict(), HEADS, "big_vision", pos_without_cls=True)
    ours = ViTForImageClassification.from_pretrained(path)
    x = torch.randn(2, 3, 16, 16)
    assert_close(ours(x).logits, t(x), "logits")


@pytest.fixture(scope="module")
def in21k(tmp_path_factory):
    """The first in21k release: pre_logits (dense + tanh) under a 21843-class head."""
    torch.manual_seed(5)
    t = timm_vit(width=32, depth=2, heads=HEADS, image_size=32, patch=8, classes=21843)
    pre = (torch.randn(32, 32) * 0.2, torch.randn(32) * 0.2)
    path = write_npz(tmp_path_factory.mktemp("npz") / "in21k.npz", t.state_dict(), HEADS, "original", pre_logits=pre)
    return t, pre, path


def test_npz_in21k_keeps_pre_logits_and_head(in21k):
    t, (w, b), path = in21k
    ours = ViTForImageClassification.from_pretrained(path)
    assert ours.config.use_pre_logits and ours.config.num_labels == 21843
    x = torch.randn(2, 3, 32, 32)
    cls = t.forward_features(x)[:, 0]  # timm has no representation layer any more: apply it by hand
    ref = t.head(torch.tanh(cls @ w.T + b))
    assert_close(ours(x).logits, ref, "logits")
    assert "vit.pooler.dense.weight" in ours.load_report.mapped


def test_npz_in21k_new_head_drops_pre_logits(in21k, caplog):
    t, _, path = in21k
    ours = ViTForImageClassification.from_pretrained(path, num_labels=10)
    assert not ours.config.use_pre_logits
    rep = ours.load_report
    assert rep.fresh == ["classifier.weight", "classifier.bias"]
    assert rep.ignored == ["classifier.bias", "classifier.weight", "vit.pooler.dense.bias", "vit.pooler.dense.weight"]
    text = logged(caplog)  # the new head said once, by its note: not again as fresh and ignored keys
    assert "the checkpoint's head for 21843 classes is left out" in text and "classifier.weight" not in text, text
    assert "ignored from checkpoint: vit.pooler.dense.bias, vit.pooler.dense.weight" in text, text
    x = torch.randn(2, 3, 32, 32)
    feats = ours.forward_head(ours.forward_features(x), pre_logits=True)
    assert_close(feats, t.forward_head(t.forward_features(x), pre_logits=True), "pre-logits features")


def test_npz_in21k_into_backbone_uses_pooler(in21k):
    t, (w, b), path = in21k
    ours = ViTModel.from_pretrained(path)
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x).pooler_output, torch.tanh(t.forward_features(x)[:, 0] @ w.T + b), "pooler_output")
    assert ours.load_report.ignored == ["classifier.bias", "classifier.weight"]


def test_npz_in21k_zero_head_is_named_and_not_presented_as_a_prediction(tmp_path, capsys, caplog):
    """The released in21k heads are zeros by design (google-research/vision_transformer#10, #32): the
    load report says so, and predict / attention warn instead of showing equal scores as a prediction."""
    from PIL import Image

    from helpers import run_main

    t = timm_vit(width=32, depth=2, heads=HEADS, image_size=32, patch=8, classes=21843)
    torch.nn.init.zeros_(t.head.weight)
    torch.nn.init.zeros_(t.head.bias)
    path = write_npz(tmp_path / "ViT-B_16.npz", t.state_dict(), HEADS, "original", pre_logits=(torch.randn(32, 32), torch.randn(32)))
    ours = ViTForImageClassification.from_pretrained(path)
    assert "this head is all zeros: the checkpoint is meant for fine-tuning" in ours.load_report.notes
    assert "this head is all zeros" in logged(caplog)
    fine_tune = ViTForImageClassification.from_pretrained(path, num_labels=10)  # a new head: nothing to warn about
    assert not any("all zeros" in n for n in fine_tune.load_report.notes)
    image = tmp_path / "cat.png"
    Image.new("RGB", (48, 40), (120, 200, 30)).save(image)
    code, out, err = run_main(["predict", "--checkpoint", str(path), str(image)], capsys)
    assert code == 0, err
    assert f"{image}: no prediction (the head is all zeros)" in out and "warning:" in err and "meant for fine-tuning" in err
    code, out, err = run_main(["attention", "--checkpoint", str(path), str(image), "--out", str(tmp_path / "att")], capsys)
    assert code == 0 and "the head is all zeros, no prediction" in out and "warning:" in err, err
    assert (tmp_path / "att" / "cat_attention.png").is_file()


def test_our_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(6)
    id2label = {0: "cat", 1: "dog", 2: "eel"}
    config = ViTConfig.from_preset("Ti/8", image_size=16, num_hidden_layers=2, hidden_size=24, intermediate_size=48, id2label=id2label)
    ours = randomize_(ViTForImageClassification(config)).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert theirs.config.id2label == id2label and theirs.config.layer_norm_eps == 1e-6
    x = torch.randn(2, 3, 16, 16)
    assert_close(ours(x).logits, theirs(x).logits, "logits")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["ViTForImageClassification"]
    again = ViTForImageClassification.from_pretrained(tmp_path)  # and our own round trip
    assert torch.equal(again(x).logits, ours(x).logits) and again.config.id2label == id2label


def test_to_google_key_names():
    """The three forms' names, spelled out (what the released files contain)."""
    t = timm_vit(width=32, depth=1, heads=HEADS, image_size=16, patch=8, classes=3)
    keys = {form: set(to_google(t.state_dict(), HEADS, form)) for form in ("augreg", "big_vision")}
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in keys["augreg"]
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in keys["augreg"]
    assert "params/Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias" in keys["big_vision"]
    assert "params/Transformer/encoderblock_0/LayerNorm_1/scale" in keys["big_vision"]
    assert "params/pos_embedding" in keys["big_vision"] and "params/Transformer/encoder_norm/scale" in keys["big_vision"]
