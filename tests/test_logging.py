"""A library that logs and raises ValueError, and a command line that prints: the load report and the
other notices go to the `vit` logger, which a library user can silence with the standard logging
settings and the command line shows as before; a user's mistake is a ValueError that user code can catch."""

import logging

import pytest
import torch
from google_npz import timm_vit

from helpers import logged, run_main, run_subprocess
from vit import UserError, ViTConfig, ViTForImageClassification


@pytest.fixture
def timm_file(tmp_path):
    """A timm ViT state-dict file: its class token without fc_norm leaves the pooling to assume, so its
    load report has a note (a warning)."""
    path = tmp_path / "vit_timm.pth"
    torch.save(timm_vit(width=32, depth=1, heads=2, image_size=16, patch=8, classes=3).state_dict(), path)
    return str(path)


def load_in_a_fresh_process(path, level=None):
    setting = f"logging.getLogger('vit').setLevel(logging.{level}); " if level else ""
    code = f"import logging, vit; {setting}vit.ViTForImageClassification.from_pretrained({path!r}, num_attention_heads=2)"
    r = run_subprocess(["-c", code], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_the_load_report_goes_to_the_vit_logger(timm_file, caplog):
    model = ViTForImageClassification.from_pretrained(timm_file, num_attention_heads=2)
    records = [r for r in caplog.records if r.name.startswith("vit.")]
    assert [r.levelno for r in records] == [logging.WARNING] and records[0].name == "vit.loading.load"
    assert records[0].getMessage() == str(model.load_report) and "global_pool='token' assumed" in logged(caplog)


def test_a_library_user_sees_the_warnings_and_can_silence_them(timm_file):
    shown = load_in_a_fresh_process(timm_file)  # no logging set up: Python shows warnings on stderr
    assert shown.stdout == "" and f"loaded timm state dict {timm_file}" in shown.stderr
    silenced = load_in_a_fresh_process(timm_file, "ERROR")
    assert silenced.stdout == "" and silenced.stderr == ""


def test_the_command_line_prints_the_report_and_leaves_the_logger_as_it_was(timm_file, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (16, 16), (10, 200, 10)).save(tmp_path / "a.png")
    logger = logging.getLogger("vit")
    before = (logger.level, logger.propagate, list(logger.handlers))
    code, out, err = run_main(["predict", "--checkpoint", timm_file, str(tmp_path / "a.png")], capsys)
    assert code == 2 and "no standard head count" in err  # width 32: the command line cannot pass the heads
    code, out, err = run_main(["predict", "--checkpoint", str(tmp_path / "nothing.pth"), str(tmp_path / "a.png")], capsys)
    assert code == 2 and "does not exist" in err
    model = ViTForImageClassification.from_pretrained(timm_file, num_attention_heads=2)
    model.save_pretrained(tmp_path / "hf")  # states its heads, its pooling and no normalization
    code, out, err = run_main(["predict", "--checkpoint", str(tmp_path / "hf"), str(tmp_path / "a.png")], capsys)
    assert code == 0, err
    assert f"loaded Hugging Face folder {tmp_path / 'hf'}: " in out  # as print showed it: the message alone, on stdout
    assert "states no normalization: assuming mean 0.5" in out and f"{tmp_path / 'a.png'}: " in out
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_a_users_mistake_is_a_value_error():
    assert issubclass(UserError, ValueError)
    with pytest.raises(ValueError, match="num_attention_heads=5 does not divide hidden_size=32"):
        ViTConfig(hidden_size=32, num_attention_heads=5)
    with pytest.raises(ValueError, match="does not exist"):
        ViTForImageClassification.from_pretrained("no/such/checkpoint.pth")
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=64, image_size=16, patch_size=8, num_labels=2))
    with pytest.raises(ValueError, match="num_channels=3"):
        model(torch.zeros(1, 1, 16, 16))
