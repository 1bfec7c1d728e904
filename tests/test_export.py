"""Export: torch.export and torch.jit.trace take both models as they are."""

import pytest
import torch
from google_npz import randomize_

from vit import ViTConfig, ViTForImageClassification, ViTModel

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=4,
              image_size=16, layer_norm_eps=1e-6, num_labels=5)


def tiny(cls=ViTForImageClassification, **kw):
    return randomize_(cls(ViTConfig(**{**CONFIG, **kw}))).eval()


@pytest.mark.parametrize("cls", [ViTForImageClassification, ViTModel])
def test_torch_export_takes_the_model_as_it_is(cls):
    model = tiny(cls)
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        got, want = program.module()(x), model(x)
    assert type(got) is type(want)  # the output dataclass survives: it is a registered pytree node
    for a, b in zip(got.to_tuple(), want.to_tuple()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [ViTForImageClassification, ViTModel])
def test_jit_trace_takes_the_model_as_it_is(cls):
    model = tiny(cls)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        y = torch.randn(3, 3, 16, 16)  # another batch size through the same trace
        got, want = traced(y), model(y).to_tuple()  # while tracing, forward returns to_tuple()
    assert isinstance(got, tuple) and len(got) == len(want) == (1 if cls is ViTForImageClassification else 2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
