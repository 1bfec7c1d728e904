"""Gradient checkpointing (HF's gradient_checkpointing_enable / _disable, train.grad_checkpointing):
the same loss and gradients as without it, dropout and drop path included, and the same training run."""

import pytest
import torch
from helpers import assert_close, make_folder, run_main, tiny_params

from vit import ViTConfig, ViTForImageClassification
from vit.loading.project import read_training_checkpoint

CONFIG = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, patch_size=4,
              image_size=16, num_labels=5, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.2)


def loss_and_grads(model, x, y, forward):
    torch.manual_seed(1)  # the same dropout and drop-path draws for both runs
    model.zero_grad()
    loss = forward(model, x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("forward", [
    lambda m, x, y: m(x, labels=y).loss,
    lambda m, x, y: sum(f.square().mean() for f in m.forward_intermediates(x, indices=[0, 2], intermediates_only=True)),
], ids=["forward", "forward_intermediates"])
def test_gradients_equal_without_checkpointing(forward):
    model = ViTForImageClassification(ViTConfig(**CONFIG)).train()
    torch.nn.init.normal_(model.classifier.weight, std=0.2)  # a zero head would give the backbone no gradient
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss, grads = loss_and_grads(model, x, y, forward)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(model, x, y, forward)
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for name, g in grads.items():
        assert_close(grads_ckpt[name], g, f"gradient of {name}", tol=1e-6)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_checkpointing_only_acts_while_training_with_gradients():
    model = ViTForImageClassification(ViTConfig(**CONFIG))
    model.gradient_checkpointing_enable()
    calls = []
    model.vit.encoder._gradient_checkpointing_func = lambda *a: calls.append(1) or a[0](*a[1:])
    x = torch.randn(2, 3, 16, 16)
    model.eval()(x)
    with torch.no_grad():
        model.train()(x)
    assert calls == []
    model.train()(x)
    assert len(calls) == CONFIG["num_hidden_layers"]


def test_training_with_grad_checkpointing_gives_the_same_weights(tmp_path, capsys):
    make_folder(tmp_path / "images", classes=3, per_class=6)
    runs = {}
    for on in (False, True):
        out = tmp_path / f"run_{on}"
        params = tiny_params(tmp_path, tmp_path / "images", epochs=1, drop_path=0.2)
        code, _, err = run_main(["--params", params, "--set", f"output.dir={out}", f"train.grad_checkpointing={str(on).lower()}"], capsys)
        assert code == 0, err
        runs[on] = read_training_checkpoint(str(out / "last.pt"))["model"]
    for k, v in runs[False].items():
        assert_close(runs[True][k], v, k, tol=1e-5)
