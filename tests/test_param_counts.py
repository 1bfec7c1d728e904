"""Pinned parameter counts (big_vision style): a preset size without a pinned count fails.

The counts were computed once from timm's equivalents (`timm.create_model("vit_base_patch16_224",
num_classes=1000)` etc.) and written in; models are built on the meta device, so no memory is used.
"""

import re

import pytest
import torch

from vit import PRESETS, ViTConfig, ViTForImageClassification, ViTModel

# (preset, image_size, num_labels): parameters; 1000 classes unless said
PINNED = {
    ("Ti/16", 224, 1000): 5_717_416,  # vit_tiny_patch16_224
    ("Ti/16", 384, 1000): 5_790_376,  # vit_tiny_patch16_384: only the position table grows
    ("S/16", 224, 1000): 22_050_664,  # vit_small_patch16_224
    ("S/32", 224, 1000): 22_878_952,  # vit_small_patch32_224
    ("B/16", 224, 1000): 86_567_656,  # vit_base_patch16_224
    ("B/32", 224, 1000): 88_224_232,  # vit_base_patch32_224
    ("B/8", 224, 1000): 86_576_872,  # vit_base_patch8_224
    ("L/16", 224, 1000): 304_326_632,  # vit_large_patch16_224
    ("L/32", 224, 1000): 306_535_400,  # vit_large_patch32_224
    ("H/14", 224, 1000): 632_045_800,  # vit_huge_patch14_224
}


def count(cls, preset, image_size, num_labels, **kw):
    with torch.device("meta"):
        model = cls(ViTConfig.from_preset(preset, image_size=image_size, num_labels=num_labels, **kw))
    return model.num_parameters()


@pytest.mark.parametrize("key", sorted(PINNED), ids=lambda k: f"{k[0]}@{k[1]}")
def test_pinned_count(key):
    got = count(ViTForImageClassification, *key)
    assert got == PINNED[key], f"{key}: {got:,} parameters, pinned {PINNED[key]:,}"


def test_every_preset_size_is_pinned():
    pinned_sizes = {re.match(r"\w+", preset).group() for preset, _, _ in PINNED}
    assert set(PRESETS) <= pinned_sizes, f"preset sizes without a pinned count: {set(PRESETS) - pinned_sizes}"


def test_hf_vit_model_with_pooler():
    assert count(ViTModel, "B/16", 224, 1000) == 86_389_248


def test_in21k_with_pre_logits():
    """The first in21k release: timm's B/16 with 21843 classes (102,595,923) plus the D x D pre_logits layer."""
    got = count(ViTForImageClassification, "B/16", 224, 21843, use_pre_logits=True)
    assert got == 102_595_923 + 768 * 768 + 768
