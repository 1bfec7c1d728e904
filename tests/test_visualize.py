"""Attention rollout, attention distance and Figure-7 computations against hand-worked numbers,
and every plot and command writing a valid PNG of the size it promises."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vit import ViTConfig, ViTForImageClassification, ViTModel, commands
from vit.data.fashion_mnist import CLASSES
from vit.viz import plots
from vit.viz.analysis import (
    attention_rollout,
    cls_rollout_map,
    embedding_filter_components,
    last_layer_cls_attention,
    mean_attention_distance,
    position_similarity,
)


def assert_png(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size, f"{path}: {im.size} != {size}"
        im.load()  # decodes the whole file: fails on a truncated PNG


# -----------------------------------------------------------------------------
# rollout


def toy_attentions():
    """Two layers, two heads, three tokens (CLS + 2 patches), batch of one."""
    identity = torch.eye(3)
    shift = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])
    to_token_1 = torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 1, 0]])
    layer1 = torch.stack((identity, shift))[None]  # (1, 2, 3, 3)
    layer2 = torch.stack((to_token_1, to_token_1))[None]
    return [layer1, layer2]


def test_rollout_matches_hand_computation():
    # layer 1: head mean [[.5,.5,0],[0,.5,.5],[.5,0,.5]], + I, rows / 2:
    #   A1 = [[.75,.25,0],[0,.75,.25],[.25,0,.75]]
    # layer 2: head mean puts everything on token 1, + I, rows / 2:
    #   A2 = [[.5,.5,0],[0,1,0],[0,.5,.5]]
    # rollout = A2 @ A1 (later layers on the left)
    expected = torch.tensor([
        [0.375, 0.5, 0.125],
        [0.0, 0.75, 0.25],
        [0.125, 0.375, 0.5],
    ])
    rollout = attention_rollout(toy_attentions())
    assert rollout.shape == (1, 3, 3)
    torch.testing.assert_close(rollout[0], expected)
    # the CLS row over the two patches, laid out on a 1x2 grid
    torch.testing.assert_close(cls_rollout_map(toy_attentions(), grid_size=(1, 2)), torch.tensor([[[0.5, 0.125]]]))


def test_rollout_order_matters():
    # A1 @ A2 would give CLS row [.375, .625, 0]: make sure that is not what we compute
    wrong = torch.tensor([0.375, 0.625, 0.0])
    assert not torch.allclose(attention_rollout(toy_attentions())[0, 0], wrong)


def test_last_layer_cls_attention_per_head():
    maps = last_layer_cls_attention(toy_attentions(), grid_size=(1, 2))
    assert maps.shape == (1, 2, 1, 2)
    torch.testing.assert_close(maps[0, 0], torch.tensor([[1.0, 0.0]]))


# -----------------------------------------------------------------------------
# mean attention distance


def test_attention_distance_self_is_zero():
    attn = torch.eye(5).expand(3, 4, 5, 5)  # (B=3, heads=4, CLS + 2x2 patches)
    dist = mean_attention_distance([attn, attn], grid_size=(2, 2), patch_size=16)
    assert dist.shape == (2, 4)
    assert torch.all(dist == 0)


def test_attention_distance_uniform_2x2():
    # uniform over CLS + 4 patches; CLS dropped and rows renormalised -> 1/4 per patch.
    # from any patch: distances 0, 16, 16, 16*sqrt(2) -> mean 16 * (2 + sqrt(2)) / 4
    attn = torch.full((2, 1, 5, 5), 0.2)
    dist = mean_attention_distance([attn], grid_size=(2, 2), patch_size=16)
    assert dist.item() == pytest.approx(16 * (2 + math.sqrt(2)) / 4, rel=1e-6)


def test_attention_distance_per_head_on_a_row():
    # 1x3 grid, patch 10: head 0 looks one patch right (the last patch looks at the first):
    # distances 10, 10, 20 -> 40/3; head 1 looks at itself -> 0
    right = torch.zeros(4, 4)
    right[0, 0] = 1.0  # CLS, ignored
    right[1, 2] = right[2, 3] = right[3, 1] = 1.0
    attn = torch.stack((right, torch.eye(4)))[None]  # (1, 2, 4, 4)
    dist = mean_attention_distance([attn], grid_size=(1, 3), patch_size=10)
    torch.testing.assert_close(dist, torch.tensor([[40 / 3, 0.0]]))


# -----------------------------------------------------------------------------
# Figure 7 from weights


def test_filter_pca_finds_the_one_direction():
    # 32 filters = mean + a_d * v: all the variance lies along v, so component 0 is +-v
    torch.manual_seed(0)
    v = torch.randn(3 * 4 * 4)
    v = v / v.norm()
    weight = (torch.randn(32, 1) * v + torch.randn(1, 48)).reshape(32, 3, 4, 4)
    comps = embedding_filter_components(weight, n=28)
    assert comps.shape == (28, 4, 4, 3)
    first = torch.from_numpy(comps[0]).permute(2, 0, 1).flatten()  # back to (C, p, p) order
    assert abs(float(first @ v)) == pytest.approx(1.0, abs=1e-4)
    # fewer filters than requested components: as many as the data has
    assert embedding_filter_components(torch.randn(5, 1, 4, 4), n=28).shape == (5, 4, 4, 1)


def test_position_similarity_known_cases():
    same = torch.ones(1, 1 + 9, 8)  # CLS + 3x3 identical embeddings
    sim = position_similarity(same)
    assert sim.shape == (3, 3, 3, 3)
    np.testing.assert_allclose(sim, 1.0, rtol=1e-6)
    one_hot = torch.cat((torch.zeros(1, 1, 6), torch.eye(6)[None]), dim=1)  # orthogonal, 2x3 grid
    sim = position_similarity(one_hot, grid_size=(2, 3))
    np.testing.assert_allclose(sim.reshape(6, 6), np.eye(6), atol=1e-6)


# -----------------------------------------------------------------------------
# plots


def test_plot_functions_write_pngs(tmp_path):
    history = [
        {"epoch": e, "loss": 1 / e, "acc": 0.5 + e / 20, "val_loss": 1.1 / e, "val_acc": 0.5 + e / 25, "val_top5": 0.9}
        for e in range(1, 5)
    ]
    assert plots.plot_curves(history, tmp_path / "curves.png") == (1000, 400)
    assert_png(tmp_path / "curves.png", (1000, 400))

    matrix = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    assert plots.plot_confusion(matrix, ["a", "b", "c"], tmp_path / "cm.png") == (600, 600)  # 6-inch minimum
    assert_png(tmp_path / "cm.png", (600, 600))

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)]
    plots.plot_misclassified(images, ["cat", "dog"], ["dog", "cat"], tmp_path / "sub" / "mis.png")
    assert_png(tmp_path / "sub" / "mis.png", (320, 180))  # 2 columns of 1.6 in, 1 row of 1.8 in

    plots.plot_attention_distance(rng.random((4, 3)) * 20, tmp_path / "dist.png")
    assert_png(tmp_path / "dist.png", (600, 470))  # one legend row below the axes


# -----------------------------------------------------------------------------
# the commands, on tiny saved checkpoints

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            image_size=16, patch_size=4, num_channels=3)


@pytest.fixture(params=["classifier", "pre_logits", "headless"])
def checkpoint(request, tmp_path):
    """A save_pretrained folder: a classifier, one with a pre_logits pooler, or a bare ViTModel."""
    if request.param == "headless":
        model = ViTModel(ViTConfig(**TINY, num_labels=0))
    else:
        config = ViTConfig(**TINY, id2label={0: "circle", 1: "square", 2: "star"},
                           use_pre_logits=request.param == "pre_logits")
        model = ViTForImageClassification(config)
        torch.nn.init.normal_(model.classifier.weight)  # a zero head would predict a tie
    model.save_pretrained(tmp_path / "ckpt")
    return request.param, str(tmp_path / "ckpt")


@pytest.fixture
def images(tmp_path):
    """Two class folders with an RGB and a grayscale PNG of odd sizes."""
    rng = np.random.default_rng(0)
    paths = []
    for cls, shape in (("a", (20, 24, 3)), ("b", (30, 18))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        path = tmp_path / "imgs" / cls / f"{cls}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_attention_command(checkpoint, images, tmp_path, capsys):
    kind, path = checkpoint
    assert commands.attention(path, images, str(tmp_path / "out"), "cpu") == 0  # the exit code: every image read
    written = sorted(str(p) for p in (tmp_path / "out").iterdir())
    assert [p.rsplit("/", 1)[1] for p in written] == ["a_attention.png", "b_attention.png"]
    for p in written:
        assert_png(p, (600, 440))  # 3 columns x 2 in; 1 + ceil(2 heads / 3) rows x 2.2 in
    out = capsys.readouterr().out
    if kind == "headless":
        assert "no classification head" in out
    else:
        assert "predicted" in out and any(name in out for name in ("circle", "square", "star"))


@pytest.mark.parametrize("checkpoint", ["classifier", "headless"], indirect=True)  # the pooler changes nothing here
def test_inspect_command(checkpoint, images, tmp_path, capsys):
    _, path = checkpoint
    folder = tmp_path / "imgs"
    (folder / "b" / "broken.png").write_bytes(b"not a png")
    written = commands.inspect(path, str(folder), str(tmp_path / "fig7"), "cpu")
    names = [p.rsplit("/", 1)[1] for p in written]
    assert names == ["embedding_filters.png", "position_similarity.png", "attention_distance.png"]
    assert_png(written[0], (700, 340))  # 16 components (= width), 7 per row, 3 rows of 1 in + title
    assert_png(written[1], (550, 400))  # 4x4 grid -> the 4-inch minimum side, + 1.5 in colour bar
    assert_png(written[2], (600, 470))  # one legend row below the axes
    assert "skipped 1 unreadable" in capsys.readouterr().out


def test_inspect_without_folder(tmp_path, capsys):
    # an arbitrary checkpoint: no images to average over, so the distance figure is skipped
    model = ViTForImageClassification(ViTConfig(**TINY, num_labels=2))
    model.save_pretrained(tmp_path / "ckpt")
    assert len(commands.inspect(str(tmp_path / "ckpt"), None, str(tmp_path / "fig7"), "cpu")) == 2
    assert "no --data-dir" in capsys.readouterr().out
    # a Fashion-MNIST checkpoint (its class names): the embedded test set stands in for the folder
    config = ViTConfig(**{**TINY, "image_size": 28, "patch_size": 7, "num_channels": 1},
                       id2label=dict(enumerate(CLASSES)))
    ViTForImageClassification(config).save_pretrained(tmp_path / "fm")
    written = commands.inspect(str(tmp_path / "fm"), None, str(tmp_path / "fig7fm"), "cpu")
    assert_png(written[2], (600, 470))  # one legend row below the axes
    assert "64 images from the Fashion-MNIST test set" in capsys.readouterr().out


def test_attention_command_skips_a_bad_image_and_exits_1(tmp_path, capsys):
    """The policy of predict, attention and features: an unreadable image is a line, the rest are done, exit 1."""
    model = ViTForImageClassification(ViTConfig(**TINY, num_labels=2))
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "notes.txt").write_text("hello")
    Image.new("RGB", (16, 16)).save(tmp_path / "good.png")
    code = commands.attention(str(tmp_path / "ckpt"), [str(tmp_path / "notes.txt"), str(tmp_path / "good.png")],
                              str(tmp_path / "out"), "cpu")
    assert code == 1 and "notes.txt: cannot read" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["good_attention.png"]
