"""The CPU fast path: train.precision on the CPU ("auto" measures, and a resumed run keeps its choice),
OpenMP's waiting policy set before torch loads, and the lines that say what a run costs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, make_folder, run_main, tiny_params
from vit import ViTConfig, ViTForImageClassification, UserError
from vit.loading.project import read_training_checkpoint
from vit import precision
from vit.train.report import cost_line, summary_line
from vit.viz.text import duration

CPU = torch.device("cpu")
SHAPE = (4, 3, 16, 16)


def tiny_model():
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=4, num_labels=3))


def test_fp16_on_the_cpu_is_refused_in_one_sentence():
    with pytest.raises(UserError, match="train.precision fp16 needs a CUDA GPU"):
        precision.resolve("fp16", CPU, tiny_model(), SHAPE)


def test_explicit_precisions_are_taken_as_given():
    for p in ("fp32", "bf16"):
        assert precision.resolve(p, CPU, tiny_model(), SHAPE)[0] == p


def test_auto_keeps_the_choice_a_resumed_run_saved():
    choice, why = precision.resolve("auto", CPU, tiny_model(), SHAPE, saved="bf16")
    assert choice == "bf16" and "resumed" in why


def test_auto_without_native_bf16_is_fp32_without_timing(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "time_steps", lambda *a: pytest.fail("should not time anything"))
    choice, why = precision.resolve("auto", CPU, tiny_model(), SHAPE)
    assert choice == "fp32" and "no native bf16" in why


@pytest.mark.parametrize("fp32_s,bf16_s,expected", [(1.0, 0.5, "bf16"), (1.0, 0.95, "fp32"), (1.0, 1.3, "fp32")])
def test_auto_takes_bf16_only_when_clearly_faster(monkeypatch, fp32_s, bf16_s, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: None)
    monkeypatch.setattr(precision, "time_steps", lambda *a: (fp32_s, bf16_s, 4))
    choice, why = precision.resolve("auto", CPU, tiny_model(), SHAPE)
    assert choice == expected and f"{fp32_s / bf16_s:.2f}x" in why


def test_timing_the_precisions_leaves_the_model_and_the_rng_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    fp32_s, bf16_s, batch = precision.time_steps(model, SHAPE, CPU)
    assert fp32_s > 0 and bf16_s > 0 and batch == SHAPE[0]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bf16_autocast_runs_the_matmuls_in_bf16_on_the_cpu():
    x = torch.randn(4, 8)
    with precision.autocast(CPU, "bf16"):
        assert (x @ x.T).dtype == torch.bfloat16
    with precision.autocast(CPU, "fp32"):
        assert (x @ x.T).dtype == torch.float32


def test_bf16_attention_on_the_cpu_takes_the_explicit_path_and_agrees_with_sdpa(monkeypatch):
    # SDPA's CPU flash kernel is several times slower in bf16 than the explicit softmax(QK^T)V, so the
    # model takes the explicit path there; in fp32 it keeps SDPA. Both give the same attention.
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(SHAPE)
    with precision.autocast(CPU, "bf16"):
        explicit = model(x).logits.float()
    real_sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].dtype) or real_sdpa(*a, **k))
    with precision.autocast(CPU, "bf16"):
        model(x)
    assert calls == []
    model(x)  # fp32: SDPA
    assert calls == [torch.float32]
    q, k, v = torch.randn(3, 2, 2, 17, 16).bfloat16()  # (B, heads, N, head_dim) each, head_dim 16: scale 1/4
    torch.testing.assert_close(real_sdpa(q, k, v).float(),
                               ((q @ k.transpose(-2, -1) / 4).softmax(-1) @ v).float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(explicit, model(x).logits, atol=5e-2, rtol=5e-2)  # bf16 against fp32


def test_a_bf16_cpu_run_saves_its_precision_and_resume_keeps_it(tmp_path, capsys):
    make_folder(tmp_path / "images")
    params = tiny_params(tmp_path, tmp_path / "images", epochs=2, precision="bf16")
    code, out, err = run_main(["--params", params, "--set", "train.epochs=1"], capsys)
    assert code == 0, err
    assert "precision bf16 (train.precision)" in out and "speed: " in out and "done: 1 epoch in " in out
    assert read_training_checkpoint(str(tmp_path / "run" / "last.pt"))["precision"] == "bf16"
    # resumed with precision "auto": the run goes on in what it started with, and its clock goes on
    code, out, err = run_main(["--params", params, "--set", "train.precision=auto", "--resume"], capsys)
    assert code == 0, err
    assert "precision bf16 (auto, as chosen when this run started" in out
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and history[0]["elapsed_s"] < history[1]["elapsed_s"]


def test_the_command_line_sets_a_passive_openmp_wait_before_torch_loads():
    code = "import vit.cli, os, sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "False"]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "ACTIVE"  # a user's own setting wins


def test_cost_line_counts_training_evaluation_and_cheaper_patch_dropout_epochs():
    # 60 s of training + 10000 / 3000 s of evaluation per epoch
    line = cost_line(1000, 60.0, 10000 / 3000, 1, [1.0] * 15, 0, CPU, "fp32")
    assert "1,000 images/s" in line and "≈ 63 s/epoch" in line and "≈ 15.8 min for 15 epochs" in line
    assert "left" not in line and "patches" not in line
    assert "(7.4 min left)" in cost_line(1000, 60.0, 10000 / 3000, 1, [1.0] * 15, 8, CPU, "fp32")
    # the first 8 epochs drop half their patches: they train in half the time
    line = cost_line(2000, 60.0, 10000 / 3000, 1, [0.5] * 8 + [1.0] * 7, 0, CPU, "fp32")
    assert "≈ 47 s/epoch with evaluation, fewer where patches drop, ≈ 11.8 min for 15 epochs" in line
    assert duration(42) == "42 s" and duration(600) == "10.0 min" and duration(3 * 3600) == "3.0 h"


def test_summary_line_names_the_best_epoch_and_the_files(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"x")
    (tmp_path / "metrics.jsonl").write_text("")
    history = [{"epoch": 1, "val_acc": 0.8}, {"epoch": 2, "val_acc": 0.9}, {"epoch": 3, "val_acc": 0.9}]
    line = summary_line(history, 125, str(tmp_path))
    assert line == f"done: 3 epochs in 2.1 min, best val_acc 0.9000 at epoch 2; in {tmp_path}: best.pt, metrics.jsonl"
