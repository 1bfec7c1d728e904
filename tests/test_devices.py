"""Devices: `train.device` and the commands' `--device` (auto: cuda, then mps, then cpu), an absent device
refused in one sentence, what MPS gets (precision, no fused AdamW, no pinned memory, no device JPEG
decode, its own RNG state), no CUDA-only call on another device, and resume across devices. This
machine has neither a CUDA GPU nor an Apple one: their availability is mocked."""

import os

import pytest
import torch

from helpers import make_folder, run_main, section, tiny_params
from vit import ViTConfig, ViTForImageClassification, data, distributed, precision
from vit.errors import UserError
from vit.loading.project import read_training_checkpoint
from vit.train import checkpoint, optim

CUDA_ONLY = ["get_rng_state_all", "set_rng_state_all", "set_device", "Stream", "Event", "is_bf16_supported"]


def mock(monkeypatch, cuda=False, mps=False, macos14=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)


def forbid_cuda(monkeypatch):
    """Every CUDA-only call the project makes now fails the test."""
    def refuse(name):
        def call(*args, **kw):
            raise AssertionError(f"torch.cuda.{name} was called")
        return call

    for name in CUDA_ONLY:
        monkeypatch.setattr(torch.cuda, name, refuse(name))


@pytest.mark.parametrize("cuda, mps, want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_takes_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, want):
    mock(monkeypatch, cuda=cuda, mps=mps)
    assert distributed.pick_device("auto").type == want
    assert distributed.pick_device("cpu").type == "cpu"  # asked for, always there


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_an_absent_device_is_one_sentence_and_exit_2(monkeypatch, tmp_path, capsys, device):
    mock(monkeypatch)
    with pytest.raises(UserError, match=f"train.device is {device} but torch sees no"):
        distributed.pick_device(device)
    make_folder(tmp_path / "images", classes=2, per_class=4)
    code, _, err = run_main(["--params", tiny_params(tmp_path, tmp_path / "images"), "--set", f"train.device={device}"], capsys)
    assert code == 2 and err.count("\n") == 1 and "set train.device to auto or cpu" in err, err
    code, _, err = run_main(["predict", "--checkpoint", str(tmp_path), str(tmp_path / "images"), "--device", device], capsys)
    assert code == 2 and f"--device is {device} but torch sees no" in err and "set --device to auto or cpu" in err, err


def test_mps_cannot_run_under_torchrun(monkeypatch):
    mock(monkeypatch, mps=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torch's process groups do not run on MPS"):
        distributed.init("mps")


@pytest.mark.parametrize("macos14, want", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_on_mps_takes_what_torch_runs_there_without_timing(monkeypatch, macos14, want):
    mock(monkeypatch, mps=True, macos14=macos14)
    monkeypatch.setattr(precision, "time_steps", lambda *a: pytest.fail("timed the CPU for an MPS run"))
    mps = torch.device("mps")
    assert precision.resolve("auto", mps, None, (8, 3, 16, 16))[0] == want
    with pytest.raises(UserError, match="fp16 needs a gradient scaler, which this project runs on CUDA only"):
        precision.resolve("fp16", mps, None, (8, 3, 16, 16))
    # a run saved in fp16 on CUDA and resumed on MPS: chosen again, and said
    chosen, why = precision.resolve("auto", mps, None, (8, 3, 16, 16), saved="fp16")
    assert chosen == want and "the run started in fp16, which mps does not run" in why


def test_nothing_cuda_only_is_set_up_for_mps(monkeypatch, tmp_path):
    mock(monkeypatch, mps=True)
    forbid_cuda(monkeypatch)
    mps = torch.device("mps")
    model = ViTForImageClassification(ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                intermediate_size=8, image_size=8, patch_size=4, num_labels=2))
    assert not optim.build_optimizer(model, section("train"), mps).defaults["fused"]
    assert optim.build_optimizer(model, section("train"), torch.device("cuda")).defaults["fused"]  # only CUDA's is fused
    make_folder(tmp_path / "images", classes=2, per_class=4)
    folder = section("data", dataset="folder", train_dir=str(tmp_path / "images"), image_size=16, channels=3,
                     mean=[0.5] * 3, std=[0.5] * 3, workers=0, in_memory=False)
    loaders = data.build_loaders(folder, section("train", batch_size=2), "cpu")  # built on the CPU: mps tensors cannot exist here
    assert not loaders.train.loader.pin_memory
    from vit.data.worker_loader import WorkerLoader

    on_mps = WorkerLoader(loaders.train.loader.dataset, loaders.train.batch_sampler, device=mps, workers=0, report={})
    assert not on_mps.loader.pin_memory  # pinned memory is CUDA's
    with pytest.raises(UserError, match="torch has no JPEG decoder on MPS"):
        data.build_loaders({**folder, "decode": "device"}, section("train", batch_size=2), mps)
    saved = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved.append(1) or torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: saved.append(2))
    state = checkpoint.rng_state(mps)
    assert state["cuda"] == [] and state["mps"] is not None
    checkpoint.set_rng_state(state, mps)
    assert saved == [1, 2]


def test_a_cpu_run_on_a_cuda_machine_makes_no_cuda_call(monkeypatch, tmp_path, capsys):
    """train.device cpu where torch sees a GPU: the run, its checkpoints and its resume never touch CUDA."""
    mock(monkeypatch, cuda=True)
    forbid_cuda(monkeypatch)
    # torch's own optimizer step asks its accelerator registry, which would reach the (absent) driver
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **kw: None)
    make_folder(tmp_path / "images", classes=2, per_class=6)
    argv = ["--params", tiny_params(tmp_path, tmp_path / "images", epochs=1), "--set", "train.device=cpu",
            "data.in_memory=false", "model.hidden_dropout_prob=0.1"]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert "training on the CPU" in out
    ckpt = read_training_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ckpt["device"] == "cpu" and ckpt["rng"][0]["cuda"] == []
    code, out, err = run_main(argv + ["train.epochs=2", "--resume"], capsys)  # more --set words
    assert code == 0, err


def test_resume_on_another_device_says_what_changes(tmp_path, capsys, monkeypatch):
    make_folder(tmp_path / "images", classes=2, per_class=6)
    argv = ["--params", tiny_params(tmp_path, tmp_path / "images", epochs=1)]
    assert run_main(argv, capsys)[0] == 0
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["device"] = "cuda"  # as if it had trained on a GPU
    ckpt["rng"][0]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    torch.save(ckpt, last)
    forbid_cuda(monkeypatch)  # the GPU's random state is not restored on the CPU
    code, out, err = run_main(argv + ["--set", "train.epochs=2", "--resume"], capsys)
    assert code == 0, err
    assert "note: the run trained on cuda and resumes on cpu" in out and "will not be bit-identical" in out
    assert read_training_checkpoint(str(last))["device"] == "cpu"


def test_the_commands_take_a_device(tmp_path, capsys):
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                        image_size=16, patch_size=8, num_labels=2,
                                        id2label={0: "class_0", 1: "class_1"})).save_pretrained(tmp_path / "model")
    make_folder(tmp_path / "images", classes=2, per_class=2)
    image = str(tmp_path / "images" / "class_0" / "0.png")
    ckpt = ["--checkpoint", str(tmp_path / "model"), "--device", "cpu"]
    commands = [["features", *ckpt, image, "--out", str(tmp_path / "f.npy")], ["attention", *ckpt, image, "--out", str(tmp_path / "att")],
                ["eval", *ckpt, "--data-dir", str(tmp_path / "images"), "--workers", "0"]]
    commands.append(["predict", *ckpt, image])
    for argv in commands:
        code, _, err = run_main(argv, capsys)
        assert code == 0, (argv[0], err)
    assert os.path.isfile(tmp_path / "f.npy")
