"""Export: torch.export and torch.jit.trace take both models as they are, and `vit export --format onnx`
writes a graph with a dynamic batch whose logits equal PyTorch's in onnxruntime (two batch sizes, two
image sizes: each size is its own export, the position embeddings resampled when loading)."""

import importlib.util

import numpy as np
import pytest
import torch
from helpers import run_main
from google_npz import randomize_

from vit import ViTConfig, ViTForImageClassification, ViTModel
from vit import export

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=4,
              image_size=16, layer_norm_eps=1e-6, num_labels=5)


# the ViT family's switches: DeiT's distillation token with registers, layer scale and CLIP's norm_pre;
# a gap model with fc_norm and no class token
FAMILY = {"plain": {}, "distilled_registers": dict(distilled=True, num_register_tokens=2, layer_scale_init=1e-5, pre_norm=True,
                                                    no_embed_class=True),
          "gap": dict(class_token=False, global_pool="avg", fc_norm=True)}
MODELS = [(cls, name) for cls in (ViTForImageClassification, ViTModel) for name in FAMILY]


def tiny(cls=ViTForImageClassification, **kw):
    return randomize_(cls(ViTConfig(**{**CONFIG, **kw}))).eval()


@pytest.mark.parametrize("cls,variant", MODELS)
def test_torch_export_takes_the_model_as_it_is(cls, variant):
    model = tiny(cls, **FAMILY[variant])
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        got, want = program.module()(x), model(x)
    assert type(got) is type(want)  # the output dataclass survives: it is a registered pytree node
    for a, b in zip(got.to_tuple(), want.to_tuple()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,variant", MODELS)
def test_jit_trace_takes_the_model_as_it_is(cls, variant):
    model = tiny(cls, **FAMILY[variant])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        y = torch.randn(3, 3, 16, 16)  # another batch size through the same trace
        got, want = traced(y), model(y).to_tuple()  # while tracing, forward returns to_tuple()
    assert isinstance(got, tuple) and len(got) == len(want) == (1 if cls is ViTForImageClassification else 2)  # logits; tokens, pooler
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(n) is None for n in export.ONNX_PACKAGES),
                                reason="onnx, onnxscript or onnxruntime not installed (pip install -r requirements.txt)")


@needs_onnx
@pytest.mark.parametrize("image_size,variant", [(None, "plain"), (32, "plain"), (32, "distilled_registers"), (None, "gap")])
def test_onnx_export_equals_pytorch_at_two_batch_sizes(tmp_path, capsys, image_size, variant):
    import onnxruntime

    tiny(**FAMILY[variant]).save_pretrained(tmp_path / "model")
    out = tmp_path / "model.onnx"
    argv = ["export", "--checkpoint", str(tmp_path / "model"), "--format", "onnx", "--out", str(out)]
    code, stdout, err = run_main(argv + (["--image-size", str(image_size)] if image_size else []), capsys)
    assert code == 0, err
    assert "max difference" in stdout and out.is_file() and not (tmp_path / "model.onnx.tmp").exists()
    size = image_size or 16
    reference = ViTForImageClassification.from_pretrained(tmp_path / "model", image_size=image_size).eval()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 3, size, size)
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        with torch.no_grad():
            want = reference(x).logits.numpy()
        assert got.shape == (batch, 5)
        assert np.abs(got - want).max() <= 1e-4, f"batch {batch}, size {size}: {np.abs(got - want).max():.2e}"


@needs_onnx
def test_onnx_export_that_differs_is_refused_and_not_written(tmp_path, capsys, monkeypatch):
    tiny().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(export, "CHECK_TOLERANCE", -1.0)  # any difference, even 0, now fails the check
    out = tmp_path / "model.onnx"
    code, _, err = run_main(["export", "--checkpoint", str(tmp_path / "model"), "--out", str(out)], capsys)
    assert code == 2 and err.count("error:") == 1 and "differs from PyTorch" in err and "not written" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "model"]


def test_onnx_export_without_the_packages_says_what_to_install(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    code, _, err = run_main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "onnxruntime missing" in err and "pip install" in err
