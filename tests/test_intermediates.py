"""forward_intermediates and prune_intermediate_layers against timm's VisionTransformer with the same
weights, every option; and the `features` command's pooled embeddings."""

import numpy as np
import pytest
import torch
from helpers import assert_close, make_folder, run_main
from google_npz import timm_vit

from vit import UserError, ViTConfig, ViTForImageClassification, ViTModel
from vit.loading.core import rename
from vit.loading.timm import TIMM_RENAMES

WIDTH, DEPTH, HEADS, PATCH, IMAGE = 32, 4, 4, 8, 32


def pair(classes=10):
    """A random timm ViT and ours with its weights."""
    theirs = timm_vit(width=WIDTH, depth=DEPTH, heads=HEADS, image_size=IMAGE, patch=PATCH, classes=classes)
    ours = ViTForImageClassification(ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                               intermediate_size=4 * WIDTH, patch_size=PATCH, image_size=IMAGE,
                                               layer_norm_eps=1e-6, num_labels=classes))
    state = rename(theirs.state_dict(), TIMM_RENAMES, "test")
    ours.load_state_dict({k if k.startswith("classifier.") else "vit." + k: v for k, v in state.items()})
    return theirs, ours.eval()


def assert_same(ours, theirs, what):
    """Equal nesting (lists, tuples) and tensors within 1e-5 relative."""
    if isinstance(theirs, torch.Tensor):
        assert_close(ours, theirs, what)
        return
    assert type(ours) is type(theirs) and len(ours) == len(theirs), f"{what}: {type(ours)} vs {type(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_same(a, b, f"{what}[{i}]")


@pytest.mark.parametrize("kw", [
    {},
    {"indices": 2},
    {"indices": [0, 2, -1], "norm": True},
    {"indices": [1], "output_fmt": "NLC"},
    {"indices": 3, "intermediates_only": True},
    {"indices": [-2], "stop_early": True},
    {"indices": [0, 3], "return_prefix_tokens": True, "output_fmt": "NLC"},
])
def test_forward_intermediates_equals_timm(kw):
    theirs, ours = pair()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ref = theirs.forward_intermediates(x, **kw)
        got = ours.forward_intermediates(x, **kw)
        got_backbone = ours.vit.forward_intermediates(x, **kw)
    assert_same(got, ref, f"forward_intermediates({kw})")
    assert_same(got_backbone, ref, f"ViTModel.forward_intermediates({kw})")


def test_intermediate_maps_are_the_hidden_states_without_the_class_token():
    _, ours = pair()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        final, maps = ours.forward_intermediates(x, output_fmt="NLC")
        out = ours.forward_features(x, output_hidden_states=True)
    assert len(maps) == DEPTH and maps[0].shape == (2, (IMAGE // PATCH) ** 2, WIDTH)
    for m, h in zip(maps, out.hidden_states[1:]):
        assert torch.equal(m, h[:, ours.config.num_prefix_tokens:])
    assert torch.equal(final, out.last_hidden_state)


def test_forward_intermediates_at_another_image_size():
    """interpolate_pos_encoding carries over: the maps follow the input's grid."""
    _, ours = pair()
    with torch.no_grad():
        maps = ours.forward_intermediates(torch.randn(1, 3, 48, 64), indices=1, intermediates_only=True,
                                          interpolate_pos_encoding=True)
    assert maps[0].shape == (1, WIDTH, 6, 8)


@pytest.mark.parametrize("kw", [dict(indices=2), dict(indices=[1], prune_norm=True), dict(indices=[0, 2], prune_head=False)])
def test_prune_intermediate_layers_equals_timm(kw):
    theirs, ours = pair()
    assert ours.prune_intermediate_layers(**kw) == theirs.prune_intermediate_layers(**kw)
    assert len(ours.vit.encoder.layer) == len(theirs.blocks) == ours.config.num_hidden_layers
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert_same(ours.forward_intermediates(x, indices=kw["indices"]), theirs.forward_intermediates(x, indices=kw["indices"]), "pruned")
        ref = theirs(x)
        # timm's pruned head pools nothing (global_pool ''): ours returns the class token, its first row
        assert_close(ours(x).logits, ref if kw.get("prune_head") is False else ref[:, 0], "pruned model's output")


def test_bad_indices_and_format_are_one_sentence():
    _, ours = pair()
    x = torch.randn(1, 3, IMAGE, IMAGE)
    for kw, words in [(dict(indices=5), "the last 5 blocks"), (dict(indices=[4]), "blocks 0 to 3"),
                      (dict(indices=[-5]), "blocks 0 to 3"), (dict(output_fmt="NHWC"), "'NCHW'")]:
        with pytest.raises(UserError, match=words):
            ours.forward_intermediates(x, **kw)


def test_backbone_without_pooler_has_the_same_intermediates():
    theirs, ours = pair()
    backbone = ViTModel(ours.config, add_pooling_layer=False).eval()
    backbone.load_state_dict(ours.vit.state_dict())
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert_same(backbone.forward_intermediates(x, indices=[1, 3]), theirs.forward_intermediates(x, indices=[1, 3]), "ViTModel")


@pytest.mark.parametrize("variant", ["dinov2_reg4", "deit_distilled", "clip", "reg4_gap", "gap"])
def test_forward_intermediates_across_the_family(variant, tmp_path):
    """Register and distillation tokens, no class token, CLIP's norm_pre: num_prefix_tokens decides what is cut."""
    from test_family import HEADS as FAMILY_HEADS
    from test_family import TIMM_VARIANTS, tiny_timm

    name, kw, image, _ = TIMM_VARIANTS[variant]
    theirs = tiny_timm(name, image, **kw)
    torch.save(theirs.state_dict(), tmp_path / "model.pth")
    ours = ViTForImageClassification.from_pretrained(tmp_path / "model.pth", num_attention_heads=FAMILY_HEADS).eval()
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        for kw in ({}, {"indices": [0, -1], "norm": True, "return_prefix_tokens": True}, {"output_fmt": "NLC", "indices": 1}):
            assert_same(ours.forward_intermediates(x, **kw), theirs.forward_intermediates(x, **kw), f"{variant} {kw}")


# -----------------------------------------------------------------------------
# the features command


def test_features_command_writes_pooled_embeddings_in_file_order(tmp_path, capsys):
    _, ours = pair()
    ours.save_pretrained(tmp_path / "model")
    names = make_folder(tmp_path / "images", classes=2, per_class=3, size=IMAGE)
    (tmp_path / "images" / "class_1" / "broken.png").write_bytes(b"not an image")
    single = tmp_path / "images" / names[0] / "0.png"
    out = tmp_path / "feats.npy"
    code, stdout, err = run_main(["features", "--checkpoint", str(tmp_path / "model"), str(single),
                                  str(tmp_path / "images" / names[1]), "--out", str(out), "--batch-size", "2"], capsys)
    assert code == 1, err  # one unreadable image: the rest are written, and the exit code says it
    feats = np.load(out)
    files = (tmp_path / "feats.txt").read_text().splitlines()
    assert files == [str(single)] + [str(tmp_path / "images" / names[1] / f"{i}.png") for i in range(3)]
    assert feats.shape == (4, WIDTH) and feats.dtype == np.float32
    assert "broken.png" in err and "skipped 1" in stdout
    # each row is what the head sees for that file, through the model's own eval transform
    from vit.data.inputs import preprocess
    from vit.factory import load_model

    model, info = load_model(str(tmp_path / "model"), torch.device("cpu"))
    with torch.no_grad():
        for row, path in zip(feats, files):
            want = model.forward_head(model.forward_features(preprocess(path, info)), pre_logits=True)[0]
            assert_close(torch.from_numpy(row), want, path)


def test_features_command_without_readable_images_refuses(tmp_path, capsys):
    _, ours = pair()
    ours.save_pretrained(tmp_path / "model")
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(["features", "--checkpoint", str(tmp_path / "model"), str(tmp_path / "empty"),
                             "--out", str(tmp_path / "f.npy")], capsys)
    assert code == 2 and err.count("error:") == 1 and "no readable images" in err
    assert not (tmp_path / "f.npy").exists()
