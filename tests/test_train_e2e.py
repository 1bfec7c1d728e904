"""A tiny end-to-end run on a generated image folder: the run folder's layout, the per-epoch line,
checkpoints and the HF folder; then the eval and predict commands on what it wrote."""

import json
import os
import re

import pytest
import torch
from PIL import Image

from helpers import make_folder, run_main, tiny_params
from vit.factory import load_model
from vit.loading.project import read_training_checkpoint

LINE = re.compile(r"^Epoch : (\d+) - loss : \d\.\d{4} - acc: \d\.\d{4} - val_loss : \d\.\d{4} - val_acc: \d\.\d{4}"
                  r" - val_top5: \d\.\d{4}$", re.M)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 6-class run of 2 epochs (6 > 5 classes, so top-5 is reported), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("e2e")
    classes = make_folder(tmp / "images", classes=6, per_class=8)
    params = tiny_params(tmp, tmp / "images", epochs=2, mixup=0.2, cutmix=0.2, layer_decay=0.8)
    torch.set_num_threads(1)
    from vit import cli

    code = cli.main(["--params", params])
    return tmp, classes, params, code


def test_run_writes_the_whole_results_layout(trained):
    tmp, classes, _, code = trained
    run = tmp / "run"
    assert code == 0
    expected = {"params.json", "metrics.jsonl", "curves.png", "confusion.png", "misclassified.png",
                "per_class_accuracy.json", "last.pt", "best.pt", "best_hf"}
    assert expected <= set(os.listdir(run)), sorted(os.listdir(run))
    for png in ("curves.png", "confusion.png", "misclassified.png"):
        with Image.open(run / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all({"loss", "acc", "val_loss", "val_acc", "val_top5", "lr", "images_per_s", "epoch_s", "elapsed_s"} <= set(h) for h in history)
    assert 0 < history[0]["epoch_s"] <= history[0]["elapsed_s"] < history[1]["elapsed_s"]  # the clock runs on
    per_class = json.loads((run / "per_class_accuracy.json").read_text())
    assert list(per_class) == classes and all(0 <= a <= 1 for a in per_class.values())
    saved = json.loads((run / "params.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["grad_accum"] == 1  # resolved: defaults filled in


def test_checkpoints_hold_everything_and_load_with_weights_only(trained):
    tmp, classes, _, _ = trained
    ckpt = read_training_checkpoint(str(tmp / "run" / "last.pt"))  # weights_only=True inside
    assert ckpt["epoch"] == 2 and ckpt["classes"] == classes and ckpt["mean"] == [0.5, 0.5, 0.5]
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "params", "config"} <= set(ckpt)
    assert len(ckpt["rng"]) == 1 and set(ckpt["rng"][0]) == {"torch", "cuda", "mps", "numpy", "python"}  # one per rank
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    config = json.loads((tmp / "run" / "best_hf" / "config.json").read_text())
    assert config["id2label"] == {str(i): c for i, c in enumerate(classes)}
    for source in ("run", "run/best.pt", "run/best_hf"):
        model, info = load_model(str(tmp / source), "cpu")
        assert info["classes"] == classes and info["image_size"] == 16 and info["channels"] == 3
        assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.25, 0.25, 0.25]
        assert not model.training


def test_per_epoch_line_is_printed(tmp_path, capsys):
    classes = make_folder(tmp_path / "images", classes=6, per_class=6)
    code, out, err = run_main(["--params", tiny_params(tmp_path, tmp_path / "images", epochs=1)], capsys)
    assert code == 0, err
    assert [int(m) for m in LINE.findall(out)] == [1], out
    assert "training on the CPU" in out and "per-class accuracy: " + classes[0] in out
    # a second plain start would overwrite the run: refused, pointing at --resume
    code, _, err = run_main(["--params", tiny_params(tmp_path, tmp_path / "images", epochs=1)], capsys)
    assert code == 2 and "--resume" in err


def test_eval_and_predict_commands(trained, capsys):
    tmp, classes, _, _ = trained
    code, out, err = run_main(["eval", "--checkpoint", str(tmp / "run"), "--data-dir", str(tmp / "images")], capsys)
    assert code == 0, err
    acc = float(re.search(r"acc: (\d\.\d+)", out).group(1))
    assert 0 <= acc <= 1 and "top5" in out
    images = [str(tmp / "images" / c / "0.png") for c in classes[:2]]
    code, out, err = run_main(["predict", "--checkpoint", str(tmp / "run" / "best.pt"), *images, "--topk", "3"], capsys)
    assert code == 0, err
    *lines, summary = out.strip().splitlines()
    assert len(lines) == 2 and summary.startswith("predicted 2 image(s) in ") and "images/s on cpu, batch 32" in summary
    for path, line in zip(images, lines):
        assert line.startswith(path + ": ")
        pairs = re.findall(r"(class_\d) (\d\.\d{4})", line)
        assert len(pairs) == 3 and all(name in classes for name, _ in pairs)
        probs = [float(p) for _, p in pairs]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    code, out, err = run_main(["predict", "--checkpoint", str(tmp / "run"), str(tmp / "missing.png")], capsys)
    assert code == 1 and "missing.png: cannot read" in err


def test_linear_probe_from_the_best_hf_folder(trained, tmp_path, capsys):
    """model.pretrained + freeze_backbone: only the new head changes, the backbone stays bit-identical."""
    tmp, classes, _, _ = trained
    make_folder(tmp_path / "images", classes=3, per_class=8, seed=1)
    params = tiny_params(tmp_path, tmp_path / "images", epochs=1, freeze_backbone=True, drop_path=0.0)
    sizes = ["model.patch_size=null", "model.hidden_size=null", "model.num_hidden_layers=null",
             "model.num_attention_heads=null", "model.intermediate_size=null"]
    code, out, err = run_main(["--params", params, "--set", f"model.pretrained={tmp / 'run' / 'best_hf'}", *sizes], capsys)
    assert code == 0, err
    assert "new classifier for num_labels=3" in out
    before = read_training_checkpoint(str(tmp / "run" / "best.pt"))["model"]
    after = read_training_checkpoint(str(tmp_path / "run" / "last.pt"))["model"]
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("classifier."))
    assert after["classifier.weight"].shape == (3, 32) and after["classifier.weight"].abs().sum() > 0


def test_a_training_checkpoint_is_a_pretrained_source_with_its_own_config(trained):
    """best.pt as model.pretrained: its config (width 32 with 4 heads, eps 1e-6) comes along, so the
    model equals the run's own."""
    tmp, _, _, _ = trained
    from vit import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(str(tmp / "run" / "best.pt")).eval()
    ref, _ = load_model(str(tmp / "run" / "best.pt"), "cpu")
    assert model.load_report.source == "training checkpoint"
    assert model.config.layer_norm_eps == ref.config.layer_norm_eps == 1e-6
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x).logits, ref(x).logits)


def test_rgb_pretrained_fine_tunes_on_gray_images(trained, tmp_path, capsys):
    """model.pretrained with 3 channels and data.channels=1: the patch kernel is adapted, not refused."""
    tmp, _, _, _ = trained
    make_folder(tmp_path / "images", classes=3, per_class=8, seed=2)
    params = tiny_params(tmp_path, tmp_path / "images", epochs=1)
    sizes = ["model.patch_size=null", "model.hidden_size=null", "model.num_hidden_layers=null",
             "model.num_attention_heads=null", "model.intermediate_size=null"]
    gray = ["data.channels=1", "data.mean=[0.5]", "data.std=[0.25]"]
    code, out, err = run_main(["--params", params, "--set", f"model.pretrained={tmp / 'run' / 'best_hf'}", *sizes, *gray], capsys)
    assert code == 0, err
    assert "patch kernel adapted 3 -> 1 input channels" in out
    rgb_kernel = read_training_checkpoint(str(tmp / "run" / "best.pt"))["model"]["vit.embeddings.patch_embeddings.projection.weight"]
    assert read_training_checkpoint(str(tmp_path / "run" / "last.pt"))["model"]["vit.embeddings.patch_embeddings.projection.weight"].shape == (32, 1, 4, 4)
    assert rgb_kernel.shape == (32, 3, 4, 4)


def test_attention_and_inspect_commands_write_pngs(trained, capsys):
    tmp, classes, _, _ = trained
    image = str(tmp / "images" / classes[0] / "1.png")
    code, out, err = run_main(["attention", "--checkpoint", str(tmp / "run"), image], capsys)
    assert code == 0, err
    assert os.listdir(tmp / "run" / "attention") and all(f.endswith(".png") for f in os.listdir(tmp / "run" / "attention"))
    code, out, err = run_main(["inspect", "--checkpoint", str(tmp / "run" / "best.pt"), "--out", str(tmp / "fig7")], capsys)
    assert code == 0, err
    assert {"embedding_filters.png", "position_similarity.png"} <= set(os.listdir(tmp / "fig7"))


def test_predict_takes_a_timm_state_dict_saved_as_pt(tmp_path, capsys):
    """A .pt that is not a training checkpoint goes to from_pretrained: same logits as timm's model."""
    import timm

    # width 192 is ViT-Ti's, so the loader knows its head count (3) without a config
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, depth=1,
                            num_classes=3).eval()
    torch.nn.init.normal_(ref.head.weight)
    torch.save(ref.state_dict(), tmp_path / "timm_vit.pt")
    model, info = load_model(str(tmp_path / "timm_vit.pt"), torch.device("cpu"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref(x), atol=1e-5)
    assert info["params"] is None and info["image_size"] == 16
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(tmp_path / "img.png")
    code, out, err = run_main(["predict", "--checkpoint", str(tmp_path / "timm_vit.pt"), str(tmp_path / "img.png")], capsys)
    assert code == 0, err
    assert out.strip().splitlines()[-2].startswith(str(tmp_path / "img.png") + ": ")  # after the load report, before the summary
    # eval of that 3-class timm file on the 6-class folder: one sentence, not a shape error from inside
    make_folder(tmp_path / "six", classes=6, per_class=2)
    code, out, err = run_main(["eval", "--checkpoint", str(tmp_path / "timm_vit.pt"), "--data-dir", str(tmp_path / "six")], capsys)
    assert code == 2 and "head for 3 classes" in err and "six has 6 classes" in err, err
