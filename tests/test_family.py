"""The ViT family's checkpoints (MAE, DeiT, DeiT III, DINOv2, CLIP, gap models): each built tiny in
timm or transformers at random init, saved, loaded here through the switches, compared (rel err <= 1e-5)."""

import json
import os

import pytest
import timm
import torch
import transformers
from google_npz import randomize_
from helpers import assert_close, logged, make_folder, run_main, tiny_params

from vit import UserError, ViTConfig, ViTForImageClassification, ViTModel
from vit.config import SWITCHES

WIDTH, DEPTH, HEADS, CLASSES = 32, 2, 4, 5

# timm name, its extra kwargs, image size (patch 14 for DINOv2, else 16; grids of 4x4 so no
# position-embedding length is ambiguous), and the switches the loader must set
TIMM_VARIANTS = {
    "mae": ("vit_base_patch16_224.mae", {}, 64, {}),
    "mae_finetune": ("vit_base_patch16_224.mae", {"global_pool": "avg"}, 64, {"global_pool": "avg", "fc_norm": True}),
    "deit3": ("deit3_small_patch16_224", {}, 64, {"layer_scale_init": 1e-5, "no_embed_class": True}),
    "dinov2": ("vit_small_patch14_dinov2", {}, 56, {"layer_scale_init": 1e-5}),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", {}, 56,
                    {"layer_scale_init": 1e-5, "num_register_tokens": 4, "no_embed_class": True}),
    "clip": ("vit_base_patch16_clip_224", {}, 64, {"pre_norm": True}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 64, {"distilled": True}),
    "gap": ("vit_base_patch16_gap_224", {}, 64, {"class_token": False, "global_pool": "avg"}),
    "gap_layer_scale": ("vit_medium_patch16_gap_240", {}, 64, {"class_token": False, "global_pool": "avg", "layer_scale_init": 1e-5}),
    "reg4_gap": ("vit_medium_patch16_reg4_gap_256", {}, 64, {"class_token": False, "global_pool": "avg", "fc_norm": True,
                                                             "layer_scale_init": 1e-5, "num_register_tokens": 4, "no_embed_class": True}),
}


def timm_switches(model):
    """Our switches as read off timm's built model: what the table above says, checked independently."""
    return dict(class_token=model.cls_token is not None, global_pool=model.global_pool,
                fc_norm=isinstance(model.fc_norm, torch.nn.LayerNorm), num_register_tokens=model.num_reg_tokens,
                layer_scale_init=1e-5 if hasattr(model.blocks[0].ls1, "gamma") else None,
                pre_norm=isinstance(model.norm_pre, torch.nn.LayerNorm), distilled=hasattr(model, "dist_token"),
                no_embed_class=model.no_embed_class)


def tiny_timm(name, image, classes=CLASSES, **kw):
    """timm's own model at width 32, depth 2, every parameter random (layer scales, registers and
    distillation token included, which timm initialises to constants)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, img_size=image,
                              num_classes=classes, **kw)
    return randomize_(model).eval()


@pytest.fixture(scope="module", params=list(TIMM_VARIANTS))
def timm_file(request, tmp_path_factory):
    name, kw, image, switches = TIMM_VARIANTS[request.param]
    model = tiny_timm(name, image, **kw)
    path = tmp_path_factory.mktemp(request.param) / "model.pth"
    torch.save(model.state_dict(), path)
    return model, path, image, switches, request.param


def test_timm_variant_logits_and_features(timm_file):
    theirs, path, image, switches, _ = timm_file
    ours = ViTForImageClassification.from_pretrained(path, num_attention_heads=HEADS).eval()
    expected = {name: switches.get(name, ViTConfig.__dataclass_fields__[name].default) for name in SWITCHES}
    assert expected == timm_switches(theirs)
    for name in SWITCHES:
        assert getattr(ours.config, name) == expected[name], f"{name}: {getattr(ours.config, name)!r}, expected {expected[name]!r}"
    assert ours.config.num_prefix_tokens == theirs.num_prefix_tokens
    assert not ours.load_report.fresh and not ours.load_report.ignored
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        ref_features = theirs.forward_features(x)
        features = ours.forward_features(x)
        assert_close(features.last_hidden_state, ref_features, "forward_features")
        assert_close(ours.forward_head(features, pre_logits=True), theirs.forward_head(ref_features, pre_logits=True), "pre-logits")
        assert_close(ours(x).logits, theirs(x), "logits")
    if switches:
        assert "ViT-family switches set" in str(ours.load_report)


def test_timm_variant_as_backbone(timm_file):
    """ViTModel takes the same file: the heads are reported as ignored, `pool` is what timm's head reads."""
    theirs, path, image, _, _ = timm_file
    ours = ViTModel.from_pretrained(path, num_attention_heads=HEADS).eval()
    assert {k.split(".")[0] for k in ours.load_report.ignored} <= {"classifier", "distillation_classifier"}
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        hidden = ours(x).last_hidden_state
        assert_close(hidden, theirs.forward_features(x), "last_hidden_state")
        if ours.config.distilled:
            return  # timm's distilled pre-logits average two tokens; the backbone's pool is the class token
        assert_close(ours.pool(hidden), theirs.forward_head(theirs.forward_features(x), pre_logits=True), "pooled")


def test_every_switch_gets_a_gradient():
    """All switches at once that can go together: each new parameter trains."""
    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=3, layer_scale_init=0.1, num_register_tokens=2,
                       pre_norm=True, distilled=True, no_embed_class=True)
    model = randomize_(ViTForImageClassification(config)).train()
    model(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 2])).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert {"vit.embeddings.distillation_token", "vit.embeddings.register_tokens", "vit.norm_pre.weight",
            "vit.encoder.layer.0.layer_scale1.lambda1", "distillation_classifier.weight"} <= dict(model.named_parameters()).keys()


def test_switches_off_keep_the_classic_keys():
    """The classic layout's state dict is exactly HF's ViTForImageClassification's."""
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=3))
    ours = ViTForImageClassification(ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                               intermediate_size=64, image_size=16, patch_size=4, num_labels=3))
    from safetensors.torch import load_file
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        assert sorted(ours.state_dict()) == sorted(load_file(f"{d}/model.safetensors"))


# -----------------------------------------------------------------------------
# the silent case: pooling the file cannot state


@pytest.fixture(scope="module")
def avg_without_fc_norm(tmp_path_factory):
    """timm's global_pool='avg', fc_norm=False with a class token: a class-token model's keys exactly."""
    model = tiny_timm("vit_base_patch16_224", 64, global_pool="avg", fc_norm=False)
    path = tmp_path_factory.mktemp("silent") / "avg.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_silent_pooling_is_reported_and_overridable(avg_without_fc_norm, caplog):
    theirs, path = avg_without_fc_norm
    x = torch.randn(2, 3, 64, 64)
    assumed = ViTForImageClassification.from_pretrained(path, num_attention_heads=HEADS).eval()
    out = logged(caplog)
    assert "global_pool='token' assumed" in out and "global_pool='avg'" in out and "model.global_pool" in out
    assert assumed.config.global_pool == "token"
    with torch.no_grad():
        assert (assumed(x).logits - theirs(x)).abs().max() > 1e-3  # the wrong guess gives other logits
    told = ViTForImageClassification.from_pretrained(path, num_attention_heads=HEADS, global_pool="avg").eval()
    assert "assumed" not in logged(caplog)
    with torch.no_grad():
        assert_close(told(x).logits, theirs(x), "logits with global_pool='avg'")


def test_config_sources_state_their_pooling(tmp_path, caplog):
    """Our own save_pretrained writes the switches, so reading it back assumes nothing."""
    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=3, global_pool="avg", fc_norm=False)
    model = randomize_(ViTForImageClassification(config)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in SWITCHES} == {k: getattr(config, k) for k in SWITCHES}
    again = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert "assumed" not in logged(caplog) and again.config.global_pool == "avg"
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(again(x).logits, model(x).logits)


@pytest.mark.parametrize("switches", [
    dict(layer_scale_init=1e-3, num_register_tokens=3, no_embed_class=True),
    dict(class_token=False, global_pool="avg", fc_norm=True, pre_norm=True),
    dict(distilled=True, hidden_act="quick_gelu"),
])
def test_our_round_trip_with_switches(tmp_path, switches):
    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=3, **switches)
    model = randomize_(ViTForImageClassification(config)).eval()
    model.save_pretrained(tmp_path)
    again = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert all(getattr(again.config, k) == getattr(config, k) for k in switches)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(again(x).logits, model(x).logits)
    assert not again.load_report.fresh and not again.load_report.ignored


def test_resampled_positions_keep_the_prefix(timm_file):
    """A new image size resamples the patch positions only, like timm's checkpoint_filter_fn."""
    theirs, path, image, _, variant = timm_file
    timm_name, kw, _, _ = TIMM_VARIANTS[variant]
    bigger = image * 3 // 2
    ours = ViTForImageClassification.from_pretrained(path, num_attention_heads=HEADS, image_size=bigger).eval()
    ref = timm.create_model(timm_name, pretrained=False, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                            img_size=bigger, num_classes=CLASSES, **kw).eval()
    from timm.models.vision_transformer import checkpoint_filter_fn
    ref.load_state_dict(checkpoint_filter_fn(theirs.state_dict(), ref))
    x = torch.randn(1, 3, bigger, bigger)
    with torch.no_grad():
        assert_close(ours(x).logits, ref(x), f"logits at {bigger}x{bigger}")


# -----------------------------------------------------------------------------
# transformers' Dinov2 and DeiT folders


def hf_kw(**kw):
    return dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, **kw)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_with_registers"])
def test_hf_dinov2_folder(tmp_path, kind):
    torch.manual_seed(1)
    if kind == "dinov2":
        theirs = transformers.Dinov2Model(transformers.Dinov2Config(**hf_kw(image_size=56, patch_size=14, layerscale_value=0.1)))
    else:
        theirs = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            **hf_kw(image_size=56, patch_size=14, num_register_tokens=4)))
    randomize_(theirs).eval().save_pretrained(tmp_path)
    ours = ViTModel.from_pretrained(tmp_path).eval()
    assert ours.config.layer_scale_init is not None and ours.config.layer_norm_eps == 1e-6
    assert ours.load_report.ignored == ["embeddings.mask_token"]  # masked pre-training only
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = theirs(pixel_values=x)
        out = ours(x)
    assert_close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    assert_close(ours.pool(out.last_hidden_state), ref.pooler_output, "pooled (Dinov2's pooler_output: the class token)")


def test_hf_dinov2_at_another_size(tmp_path):
    """Dinov2 resizes its positions on every call; ours does with interpolate_pos_encoding=True, the same way."""
    torch.manual_seed(4)
    theirs = transformers.Dinov2Model(transformers.Dinov2Config(**hf_kw(image_size=56, patch_size=14)))
    randomize_(theirs).eval().save_pretrained(tmp_path)
    ours = ViTModel.from_pretrained(tmp_path).eval()
    for size in (84, 42):
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert_close(ours(x, interpolate_pos_encoding=True).last_hidden_state, theirs(pixel_values=x).last_hidden_state,
                         f"last_hidden_state at {size}x{size}")


def test_mae_fine_tuning_recipe(tmp_path):
    """MAE's own fine-tuning: avg pooling with a fresh fc_norm, the pre-training file's final norm unused."""
    mae = tiny_timm("vit_base_patch16_224.mae", 64, classes=0)
    torch.save(mae.state_dict(), tmp_path / "mae.pth")
    ours = ViTForImageClassification.from_pretrained(tmp_path / "mae.pth", num_attention_heads=HEADS, global_pool="avg",
                                                     fc_norm=True, num_labels=3).eval()
    rep = ours.load_report
    assert rep.fresh == ["vit.fc_norm.weight", "vit.fc_norm.bias", "classifier.weight", "classifier.bias"]
    assert rep.ignored == ["vit.layernorm.bias", "vit.layernorm.weight"]
    ref = timm.create_model("vit_base_patch16_224.mae", pretrained=False, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                            img_size=64, num_classes=3, global_pool="avg").eval()  # fc_norm at its init: ones, zeros
    missing, unexpected = ref.load_state_dict(mae.state_dict(), strict=False)
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"} and set(unexpected) == {"norm.weight", "norm.bias"}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                     ref.forward_head(ref.forward_features(x), pre_logits=True), "pre-logits")


def test_hf_deit_with_teacher_folder(tmp_path):
    torch.manual_seed(2)
    id2label = {i: f"c{i}" for i in range(CLASSES)}
    theirs = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(
        **hf_kw(intermediate_size=64, image_size=32, patch_size=8, id2label=id2label, label2id={v: k for k, v in id2label.items()})))
    randomize_(theirs).eval().save_pretrained(tmp_path)
    ours = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert ours.config.distilled and ours.config.id2label == id2label
    assert not ours.load_report.fresh and not ours.load_report.ignored
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = theirs(pixel_values=x)
        assert_close(ours(x).logits, ref.logits, "logits (the mean of both heads)")
        hidden = ours.forward_features(x).last_hidden_state
        assert_close(ours.classifier(hidden[:, 0]), ref.cls_logits, "class-token head")
        assert_close(ours.distillation_classifier(hidden[:, 1]), ref.distillation_logits, "distillation head")


def test_hf_deit_backbone_into_classifier_gets_fresh_heads(tmp_path):
    theirs = transformers.DeiTModel(transformers.DeiTConfig(**hf_kw(intermediate_size=64, image_size=32, patch_size=8)))
    randomize_(theirs).eval().save_pretrained(tmp_path)
    ours = ViTForImageClassification.from_pretrained(tmp_path, num_labels=3).eval()
    assert ours.load_report.fresh == ["classifier.weight", "classifier.bias", "distillation_classifier.weight", "distillation_classifier.bias"]
    assert ours.load_report.ignored == ["vit.pooler.dense.bias", "vit.pooler.dense.weight"]
    backbone = ViTModel.from_pretrained(tmp_path).eval()
    assert not backbone.load_report.fresh and not backbone.load_report.ignored
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = theirs(pixel_values=x)
        assert_close(ours.forward_features(x).last_hidden_state, ref.last_hidden_state, "last_hidden_state")
        assert_close(backbone(x).pooler_output, ref.pooler_output, "DeiT's pooler")


def test_hf_deit_single_head_folder_gets_fresh_heads(tmp_path, caplog):
    """DeiTForImageClassification reads the class token alone beside a distillation token: its head is not
    half of our pair, so both start fresh (said), and the backbone is still exact."""
    theirs = transformers.DeiTForImageClassification(transformers.DeiTConfig(
        **hf_kw(intermediate_size=64, image_size=32, patch_size=8, num_labels=3)))
    randomize_(theirs).eval().save_pretrained(tmp_path)
    ours = ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert "no distillation head beside it" in logged(caplog)
    assert ours.load_report.ignored == ["classifier.bias", "classifier.weight"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours.forward_features(x).last_hidden_state, theirs.deit(pixel_values=x).last_hidden_state, "last_hidden_state")


# -----------------------------------------------------------------------------
# what still does not fit is refused in one sentence


def raises(words, fn, *args, **kw):
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("name,kw,words", [
    ("vit_base_patch16_siglip_224", {}, ["attn_pool.", "attention-pooling head"]),
    ("vit_base_patch16_224", {"qk_norm": True}, ["q_norm", "qk-norm"]),
    ("vit_base_patch16_224", {"scale_mlp_norm": True}, ["mlp.norm", "scale_mlp_norm"]),
])
def test_variants_that_do_not_fit_are_refused(tmp_path, name, kw, words):
    torch.save(tiny_timm(name, 32, **kw).state_dict(), tmp_path / "m.pth")
    raises([str(tmp_path / "m.pth"), "no counterpart", *words], ViTForImageClassification.from_pretrained,
           tmp_path / "m.pth", num_attention_heads=HEADS)


def test_packed_swiglu_is_refused(tmp_path):
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=WIDTH, depth=1, num_heads=HEADS, mlp_layer=SwiGLUPacked,
                              act_layer=torch.nn.SiLU, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "swiglu.pth")
    raises(["swiglu.pth", "packed SwiGLU", "no counterpart"], ViTForImageClassification.from_pretrained,
           tmp_path / "swiglu.pth", num_attention_heads=HEADS)


def test_hf_folders_that_do_not_fit_are_refused(tmp_path):
    theirs = transformers.Dinov2Model(transformers.Dinov2Config(**hf_kw(image_size=28, patch_size=14, use_swiglu_ffn=True)))
    theirs.save_pretrained(tmp_path / "swiglu")
    raises(["use_swiglu_ffn", "SwiGLU"], ViTModel.from_pretrained, tmp_path / "swiglu")
    (tmp_path / "beit").mkdir()
    (tmp_path / "beit" / "config.json").write_text(json.dumps({"model_type": "beit", "hidden_size": 32, "num_attention_heads": 4}))
    raises(["model_type='beit'", "DeiT or DINOv2"], ViTModel.from_pretrained, tmp_path / "beit")


def test_impossible_switch_combinations():
    raises(["global_pool='token'", "class_token=True"], ViTConfig, class_token=False)
    raises(["distilled=True", "global_pool='token'"], ViTConfig, distilled=True, global_pool="avg")
    raises(["global_pool='max'"], ViTConfig, global_pool="max")
    raises(["num_register_tokens=-1"], ViTConfig, num_register_tokens=-1)
    raises(["layer_scale_init='small'"], ViTConfig, layer_scale_init="small")


# -----------------------------------------------------------------------------
# params.json fine-tunes them through model.pretrained


NULL_SIZES = ["model.patch_size=null", "model.hidden_size=null", "model.num_hidden_layers=null",
              "model.num_attention_heads=null", "model.intermediate_size=null"]


def ti_file(tmp_path, name, image, **kw):
    """A one-block timm file at ViT-Ti's width (192), whose head count (3) the loader knows without a config."""
    torch.manual_seed(3)
    model = randomize_(timm.create_model(name, pretrained=False, embed_dim=192, depth=1, num_heads=3, img_size=image,
                                         num_classes=0, **kw))
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    return str(tmp_path / f"{name}.pth")


def test_params_fine_tune_dinov2_with_registers(tmp_path, capsys):
    """A whole run: the switches come from the file, positions are resampled around the prefix, and
    best_hf carries the switches back."""
    pretrained = ti_file(tmp_path, "vit_small_patch14_reg4_dinov2", 56)
    make_folder(tmp_path / "images", classes=3, per_class=6)
    params = tiny_params(tmp_path, tmp_path / "images", epochs=1, drop_path=0.0)
    code, out, err = run_main(["--params", params, "--set", f"model.pretrained={pretrained}", "data.image_size=28",
                               *NULL_SIZES], capsys)
    assert code == 0, err
    assert "num_register_tokens=4" in out and "position embeddings resampled 4x4 -> 2x2" in out
    saved = json.loads((tmp_path / "run" / "best_hf" / "config.json").read_text())
    assert (saved["num_register_tokens"], saved["no_embed_class"], saved["layer_scale_init"]) == (4, True, 1e-5)
    again = ViTForImageClassification.from_pretrained(tmp_path / "run" / "best_hf")
    assert not again.load_report.fresh and not again.load_report.ignored


def test_params_global_pool_settles_the_silent_case(tmp_path, caplog):
    from vit import params as P
    from vit.factory import build_model

    pretrained = ti_file(tmp_path, "vit_tiny_patch16_224", 32, global_pool="avg", fc_norm=False)
    make_folder(tmp_path / "images", classes=3, per_class=2)
    path = tiny_params(tmp_path, tmp_path / "images")
    overrides = [f"model.pretrained={pretrained}", "data.image_size=32", *NULL_SIZES]
    build_model(P.load(path, overrides), ["a", "b", "c"])
    assert "global_pool='token' assumed" in logged(caplog)
    model = build_model(P.load(path, overrides + ["model.global_pool=avg"]), ["a", "b", "c"])
    assert model.config.global_pool == "avg" and "assumed" not in logged(caplog)
    with pytest.raises(UserError, match="model.global_pool"):
        P.load(path, overrides + ["model.global_pool=max"])


def test_linear_probe_trains_both_distilled_heads(tmp_path):
    from vit.train import optim

    pretrained = ti_file(tmp_path, "deit_tiny_distilled_patch16_224", 32)
    model = ViTForImageClassification.from_pretrained(pretrained, num_labels=3)
    optim.freeze_backbone(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "classifier.weight", "classifier.bias", "distillation_classifier.weight", "distillation_classifier.bias"}


def test_attention_and_inspect_commands_skip_the_prefix_tokens(tmp_path, capsys):
    """Registers and a distillation token are not patches: the maps still fill the patch grid."""
    config = ViTConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64,
                       image_size=16, patch_size=4, num_labels=3, num_register_tokens=2, distilled=True, no_embed_class=True)
    randomize_(ViTForImageClassification(config)).save_pretrained(tmp_path / "model")
    make_folder(tmp_path / "images", classes=3, per_class=2, size=16)
    image = str(tmp_path / "images" / "class_0" / "0.png")
    code, out, err = run_main(["attention", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "att"), image], capsys)
    assert code == 0, err
    code, out, err = run_main(["inspect", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "fig7"),
                               "--data-dir", str(tmp_path / "images")], capsys)
    assert code == 0, err
    assert {"position_similarity.png", "attention_distance.png"} <= set(os.listdir(tmp_path / "fig7"))
    gap = ViTConfig(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64,
                    image_size=16, patch_size=4, num_labels=3, class_token=False, global_pool="avg")
    randomize_(ViTForImageClassification(gap)).save_pretrained(tmp_path / "gap")
    code, out, err = run_main(["attention", "--checkpoint", str(tmp_path / "gap"), image], capsys)
    assert code == 2 and "no class token" in err, err
