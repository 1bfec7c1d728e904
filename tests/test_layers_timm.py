"""Each module against its timm counterpart with the same weights, at several sizes (rel err <= 1e-5)."""

from functools import partial

import pytest
import torch
import torch.nn as nn
from helpers import assert_close
from google_npz import randomize_, timm_vit
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Attention, Block

from vit import ViTConfig, ViTForImageClassification, ViTModel
from vit.loading.core import rename
from vit.loading.timm import TIMM_RENAMES
from vit.model import PatchEmbeddings, ViTAttention, ViTLayer, ViTSelfAttention

# (width, heads, depth, patch, image): small, odd head_dim, many heads, one head, non-square-ish grids
SIZES = [(32, 4, 2, 8, 32), (48, 3, 1, 4, 16), (64, 16, 2, 16, 48), (24, 1, 3, 6, 24)]


def config(width, heads, depth, patch, image, **kw):
    return ViTConfig(hidden_size=width, num_attention_heads=heads, num_hidden_layers=depth, intermediate_size=4 * width,
                     patch_size=patch, image_size=image, layer_norm_eps=1e-6, **kw)


def ours_from_timm(module, timm_prefix, our_prefix, ours):
    """Load a timm submodule's weights into ours through the loader's own rename table."""
    state = rename({timm_prefix + k: v for k, v in module.state_dict().items()}, TIMM_RENAMES, "test")
    ours.load_state_dict({k[len(our_prefix):]: v for k, v in state.items()}, strict=True)
    return ours.eval()


@pytest.mark.parametrize("size", SIZES)
def test_patch_embed(size):
    width, heads, depth, patch, image = size
    theirs = randomize_(PatchEmbed(img_size=image, patch_size=patch, in_chans=3, embed_dim=width))
    ours = PatchEmbeddings(config(*size))
    ours.projection.load_state_dict(theirs.proj.state_dict())
    x = torch.randn(2, 3, image, image)
    assert_close(ours(x), theirs(x), "patch tokens")


@pytest.mark.parametrize("size", SIZES)
def test_attention(size):
    width, heads = size[:2]
    theirs = randomize_(Attention(width, num_heads=heads, qkv_bias=True)).eval()
    ours = ours_from_timm(theirs, "blocks.0.attn.", "encoder.layer.0.attention.", ViTAttention(config(*size)))
    x = torch.randn(2, 9, width)
    assert_close(ours(x)[0], theirs(x), "attention output")


@pytest.mark.parametrize("size", SIZES)
def test_block(size):
    width, heads = size[:2]
    theirs = randomize_(Block(width, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))).eval()
    ours = ours_from_timm(theirs, "blocks.0.", "encoder.layer.0.", ViTLayer(config(*size)))
    x = torch.randn(2, 9, width)
    assert_close(ours(x)[0], theirs(x), "block output")


@pytest.mark.parametrize("size,classes", [(s, 10) for s in SIZES[1:]] + [(SIZES[0], 21843)])
def test_vision_transformer(size, classes):
    """The whole model, hidden states block by block, the final norm and the (21k) head."""
    width, heads, depth, patch, image = size
    theirs = timm_vit(width=width, depth=depth, heads=heads, image_size=image, patch=patch, classes=classes)
    ours = ViTForImageClassification(config(*size, num_labels=classes))
    state = {"vit." + k if not k.startswith("classifier.") else k: v for k, v in rename(theirs.state_dict(), TIMM_RENAMES, "test").items()}
    ours.load_state_dict(state, strict=True)
    ours.eval()
    blocks = []
    hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o)) for b in theirs.blocks]
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        ref_features = theirs.forward_features(x)
        ref_logits = theirs.forward_head(ref_features)
        out = ours(x, output_hidden_states=True)
        features = ours.forward_features(x).last_hidden_state
    for h in hooks:
        h.remove()
    assert len(out.hidden_states) == depth + 1
    for i, (h, ref) in enumerate(zip(out.hidden_states[1:], blocks)):
        assert_close(h, ref, f"hidden state after block {i}")
    assert_close(features, ref_features, "final layernorm output")
    assert_close(out.logits, ref_logits, f"logits ({classes} classes)")


@pytest.mark.parametrize("size", SIZES)
def test_sdpa_matches_explicit_softmax(size):
    ours = randomize_(ViTSelfAttention(config(*size))).eval()
    x = torch.randn(2, 9, size[0])
    fused, _ = ours(x, output_attentions=False)
    explicit, probs = ours(x, output_attentions=True)
    assert_close(fused, explicit, "SDPA vs explicit softmax")
    assert probs.shape == (2, size[1], 9, 9)
    assert torch.allclose(probs.sum(-1), torch.ones(2, size[1], 9), atol=1e-6)


def test_attention_maps_do_not_change_the_output():
    model = randomize_(ViTForImageClassification(config(32, 4, 2, 8, 32, num_labels=5))).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = model(x).logits
    with_maps = model(x, output_attentions=True)
    assert_close(with_maps.logits, plain, "logits with output_attentions")
    assert len(with_maps.attentions) == 2 and with_maps.attentions[0].shape == (2, 4, 17, 17)


@pytest.mark.parametrize("use_pre_logits", [False, True])
def test_every_parameter_gets_a_gradient(use_pre_logits):
    model = randomize_(ViTForImageClassification(config(32, 4, 2, 8, 16, num_labels=3, use_pre_logits=use_pre_logits,
                                                        drop_path_rate=0.1, hidden_dropout_prob=0.1)))
    model.train()
    out = model(torch.randn(4, 3, 16, 16), labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name} has a zero or non-finite gradient"


def test_backbone_pooler_gets_a_gradient():
    model = randomize_(ViTModel(config(32, 4, 1, 8, 16)))
    out = model(torch.randn(2, 3, 16, 16))
    (out.pooler_output.sum() + out.last_hidden_state.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
