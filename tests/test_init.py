"""weight_init: "trunc_normal" is HF's and timm's default init, "jax" the original Flax code's (timm's
init_weights_vit_jax), checked by the statistics each scheme must give (one draw, large enough)."""

import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vit import ViTConfig, ViTForImageClassification

D, M, P, C = 192, 768, 8, 3


def ours(weight_init):
    config = ViTConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=3, intermediate_size=M, image_size=32,
                       patch_size=P, num_channels=C, num_labels=10, weight_init=weight_init)
    return ViTForImageClassification(config)


def close(a, b, what, rel=0.06):
    assert abs(a - b) <= rel * abs(b), f"{what}: {a:.5f} vs {b:.5f}"


def test_jax_init_matches_timm_and_flax():
    model, layer = ours("jax"), None
    layer = model.vit.encoder.layer[0]
    ref = VisionTransformer(img_size=32, patch_size=P, in_chans=C, num_classes=10, embed_dim=D, depth=2, num_heads=3,
                            mlp_ratio=M / D, weight_init="jax")
    # the MLP and the patch kernel: the same fan-in/fan-out as timm's, so the same spread
    close(layer.intermediate.dense.weight.std().item(), ref.blocks[0].mlp.fc1.weight.std().item(), "fc1 (xavier)")
    close(layer.output.dense.weight.std().item(), ref.blocks[0].mlp.fc2.weight.std().item(), "fc2 (xavier)")
    close(model.vit.embeddings.patch_embeddings.projection.weight.std().item(),
          ref.patch_embed.proj.weight.std().item(), "patch kernel (lecun normal)")
    # query/key/value: Xavier per D x D matrix as Flax keeps them (timm draws one fused 3D x D matrix)
    bound = math.sqrt(6 / (2 * D))
    for w in (layer.attention.attention.query.weight, layer.attention.attention.key.weight, layer.attention.attention.value.weight):
        assert w.abs().max() <= bound
        close(w.std().item(), bound / math.sqrt(3), "q/k/v (xavier per matrix)")
    # LeCun normal truncated at two standard deviations
    kernel = model.vit.embeddings.patch_embeddings.projection.weight
    s = math.sqrt(1 / (C * P * P)) / .87962566103423978
    assert kernel.abs().max() <= 2 * s
    assert torch.all(model.classifier.weight == 0) and torch.all(layer.intermediate.dense.bias == 0)


@pytest.mark.parametrize("weight_init", ["trunc_normal", "jax"])
def test_head_starts_at_zero_and_layernorms_at_identity(weight_init):
    model = ours(weight_init)
    assert torch.all(model.classifier.weight == 0) and torch.all(model.classifier.bias == 0)
    assert torch.all(model.vit.layernorm.weight == 1) and torch.all(model.vit.layernorm.bias == 0)


def test_trunc_normal_is_hf_default():
    model = ours("trunc_normal")
    close(model.vit.encoder.layer[0].attention.attention.query.weight.std().item(), 0.02, "query", rel=0.05)
