"""train.ema_decay: timm's ModelEmaV3 with its warm-up, updated after every optimizer step; evaluated
beside the weights (val_acc_ema), saved in the checkpoints, and picking best.pt and best_hf/ when
output.best_metric says so. Exact resume with EMA is in tests/test_resume.py."""

import json

import pytest
import torch
from helpers import make_folder, run_main, tiny_params
from torch.optim.optimizer import register_optimizer_step_post_hook

from vit import ViTForImageClassification
from vit.loading.project import read_training_checkpoint

DECAY = 0.9


def timm_decay(step):
    """ModelEmaV3.get_decay with use_warmup=True (warmup_gamma 1, power 2/3), written out."""
    s = step - 1
    return 0.0 if s <= 0 else min(1 - (1 + s) ** (-2 / 3), DECAY)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A 2-epoch run with the EMA picking best, and its weights after each of its optimizer steps."""
    from vit import cli
    from vit import factory

    tmp = tmp_path_factory.mktemp("ema")
    make_folder(tmp / "images", classes=3, per_class=10)
    models, seen = [], []
    build = factory.build_model
    factory.build_model = lambda *a: models.append(build(*a)) or models[-1]
    hook = register_optimizer_step_post_hook(
        lambda *_: seen.append({n: p.detach().clone() for n, p in models[0].named_parameters()}))
    try:
        code = cli.main(["--params", tiny_params(tmp, tmp / "images", ema_decay=DECAY), "--set", "output.best_metric=val_acc_ema"])
    finally:
        hook.remove()
        factory.build_model = build
    assert code == 0
    return tmp / "run", seen


def test_ema_is_timms_warmed_up_average_of_every_step(ema_run):
    run, seen = ema_run
    ckpt = read_training_checkpoint(str(run / "last.pt"))
    assert len(seen) == 6  # 2 epochs of 3 steps (22 train images, batch 8)
    ema = None
    for step, weights in enumerate(seen, start=1):
        d = timm_decay(step)
        ema = dict(weights) if ema is None else {k: ema[k] * d + w * (1 - d) for k, w in weights.items()}
    assert ema.keys() == ckpt["model_ema"].keys()
    for name, want in ema.items():
        torch.testing.assert_close(ckpt["model_ema"][name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ckpt["model_ema"]["classifier.weight"], ckpt["model"]["classifier.weight"])


def test_val_acc_ema_is_reported_and_picks_best(ema_run, capsys):
    run, _ = ema_run
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_acc", "val_loss", "val_acc_ema", "val_loss_ema"} <= h.keys() for h in history)
    best_epoch = max(history, key=lambda h: h["val_acc_ema"])["epoch"]
    best = read_training_checkpoint(str(run / "best.pt"))
    assert best["epoch"] == best_epoch and best["best_acc"] == history[best_epoch - 1]["val_acc_ema"]
    # best_hf/ is the EMA weights that scored; the run's best.pt keeps both, and --ema takes the average
    hf = ViTForImageClassification.from_pretrained(run / "best_hf")
    ema = ViTForImageClassification.from_pretrained(run / "best.pt", ema=True)
    plain = ViTForImageClassification.from_pretrained(run / "best.pt")
    capsys.readouterr()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k
    assert not torch.equal(plain.classifier.weight, ema.classifier.weight)
    assert any("also holds EMA weights (model_ema)" in n for n in plain.load_report.notes)


def test_epoch_line_and_summary_name_the_ema(tmp_path, capsys):
    make_folder(tmp_path / "images", classes=3, per_class=6)
    code, out, err = run_main(["--params", tiny_params(tmp_path, tmp_path / "images", epochs=1, ema_decay=0.5)], capsys)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("Epoch : 1"))
    assert " - val_acc: " in line and line.split(" - ")[-1].startswith("val_acc_ema: ")
    assert "best val_acc " in out  # output.best_metric defaults to the weights themselves
    code, out, err = run_main(["predict", "--checkpoint", str(tmp_path / "run"), "--ema",
                               str(tmp_path / "images" / "class_0" / "0.png")], capsys)
    assert code == 0 and "the EMA weights, as asked" in out, err


def test_resuming_with_another_ema_setting_is_refused(tmp_path, capsys):
    make_folder(tmp_path / "images", classes=3, per_class=6)
    params = tiny_params(tmp_path, tmp_path / "images", epochs=2)
    code, _, err = run_main(["--params", params, "--set", "train.epochs=1"], capsys)
    assert code == 0, err
    code, _, err = run_main(["--params", params, "--set", "train.ema_decay=0.9", "--resume"], capsys)
    assert code == 2 and err.count("error:") == 1 and "without an EMA" in err and "train.ema_decay is set" in err
