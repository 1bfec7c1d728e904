"""The checkpoints timm's train.py writes (its own CheckpointSaver: epoch, arch, state_dict, optimizer,
version, args as an argparse.Namespace, metric, state_dict_ema) as model_best.pth.tar and
checkpoint-N.pth.tar: loaded safely, the EMA weights on request; a code-running pickle is still refused."""

import argparse
import builtins

import pytest
import torch
from google_npz import timm_vit
from helpers import assert_close, run_main
from timm.utils import CheckpointSaver, ModelEmaV3

from vit import UserError, ViTForImageClassification

WIDTH, HEADS = 192, 3  # a standard width: a file without a config needs no head-count override


class Evil:
    """Pickles to a call that writes a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def train_args(**extra):
    """An argparse.Namespace like train.py's: strings, numbers, lists, tuples, None and bools."""
    return argparse.Namespace(model="vit_tiny_patch16_224", lr=5e-4, epochs=300, mean=None, input_size=[3, 32, 32],
                              betas=(0.9, 0.999), model_ema=True, model_ema_decay=0.9998, amp=False, **extra)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny timm model trained one step, its EMA, and timm's CheckpointSaver's files of it."""
    root = tmp_path_factory.mktemp("timm_train")
    torch.manual_seed(7)
    model = timm_vit(width=WIDTH, depth=1, heads=HEADS, image_size=32, patch=8, classes=10).train()
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
    optimizer.step()
    ema.update(model, step=10)  # decay 0.5: halfway between the two weights
    saver = CheckpointSaver(model, optimizer, args=train_args(), model_ema=ema, checkpoint_dir=str(root),
                            recovery_dir=str(root), max_history=2)
    saver.save_checkpoint(epoch=0, metric=71.5)
    return root, model.eval(), ema.module.eval()


@pytest.mark.parametrize("name", ["model_best.pth.tar", "checkpoint-0.pth.tar", "last.pth.tar"])
def test_timm_train_checkpoints_load(saved, name):
    root, model, ema = saved
    raw = torch.load(root / name, weights_only=False)  # what the file holds, read here the unsafe way on purpose
    assert {"epoch", "arch", "state_dict", "optimizer", "version", "args", "metric", "state_dict_ema"} <= raw.keys()
    assert isinstance(raw["args"], argparse.Namespace)
    x = torch.randn(2, 3, 32, 32)
    ours = ViTForImageClassification.from_pretrained(root / name)
    assert_close(ours(x).logits, model(x), "logits of state_dict")
    assert any("also holds EMA weights (state_dict_ema)" in n for n in ours.load_report.notes)
    ours_ema = ViTForImageClassification.from_pretrained(root / name, ema=True)
    assert_close(ours_ema(x).logits, ema(x), "logits of state_dict_ema")
    assert not torch.allclose(ours(x).logits, ours_ema(x).logits)


def test_deit_style_model_ema_key_and_the_cli_flag(saved, tmp_path, capsys):
    root, model, ema = saved
    path = tmp_path / "deit_checkpoint.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "args": train_args(), "epoch": 3}, path)
    ours = ViTForImageClassification.from_pretrained(path, ema=True)
    x = torch.randn(2, 3, 32, 32)
    assert_close(ours(x).logits, ema(x), "logits of model_ema")
    feats = tmp_path / "f.npy"
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    code, _, err = run_main(["features", "--checkpoint", str(path), "--ema", str(image), "--out", str(feats)], capsys)
    assert code == 0 and feats.is_file(), err


def test_asking_for_ema_weights_a_file_lacks_is_one_sentence(saved, tmp_path):
    root, model, _ = saved
    torch.save({"state_dict": model.state_dict(), "args": train_args()}, tmp_path / "no_ema.pth.tar")
    with pytest.raises(UserError, match=r"no_ema.pth.tar holds no EMA weights \(model_ema or state_dict_ema\)"):
        ViTForImageClassification.from_pretrained(tmp_path / "no_ema.pth.tar", ema=True)
    with pytest.raises(UserError, match="holds no EMA weights"):
        ViTForImageClassification.from_pretrained(tmp_path, ema=True)  # a folder (not an HF one either)


@pytest.mark.parametrize("where", ["inside the args", "beside the args"])
def test_code_running_pickle_in_a_pth_tar_is_still_refused(saved, tmp_path, where):
    root, model, _ = saved
    marker = tmp_path / "marker"
    args = train_args(evil=Evil(marker)) if where == "inside the args" else train_args()
    extra = {} if where == "inside the args" else {"evil": Evil(marker)}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": model.state_dict(), "args": args, "epoch": 1, **extra}, path)
    with pytest.raises(UserError, match="holds pickled objects that could run code"):
        ViTForImageClassification.from_pretrained(path)
    assert not marker.exists(), "the pickle ran code"


def test_the_allow_list_is_scoped_to_the_load(saved):
    """Namespace is allowed inside the loader's torch.load only, not for the rest of the process."""
    root, _, _ = saved
    ViTForImageClassification.from_pretrained(root / "model_best.pth.tar")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(root / "model_best.pth.tar", weights_only=True)
