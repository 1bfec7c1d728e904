"""Each module against transformers' ViT module, loaded with the same state dict.

transformers 5 reorganised its ViT in memory (`layers.N.attention.q_proj`, `mlp.fc1`; no
ViTSelfAttention/ViTEncoder classes) but still writes the classic keys to disk, which are ours.
So whole models are compared through the saved file, and submodules through a rename table
equal to transformers' own "ViTModel" entry in conversion_mapping.py.
"""

import pytest
import torch
import transformers
from helpers import assert_close
from google_npz import randomize_
from safetensors.torch import load_file
from transformers.models.vit import modeling_vit as hf

from vit import ViTConfig, ViTForImageClassification, ViTModel
from vit.model import ViTAttention, ViTEmbeddings, ViTEncoder, ViTLayer, ViTSelfAttention

# (width, heads, depth, patch, image)
SIZES = [(32, 4, 2, 8, 32), (48, 3, 1, 4, 16), (64, 16, 2, 16, 48)]
HF_MEMORY_NAMES = [  # ours (= on disk) -> transformers 5 in memory; order matters
    ("encoder.layer.", "layers."),
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    ("output.dense", "mlp.fc2"),
]


def hf_memory_name(key):
    for old, new in HF_MEMORY_NAMES:
        key = key.replace(old, new)
    return key


def configs(width, heads, depth, patch, image, **kw):
    """The same architecture as our config and as transformers' (eager attention, HF's eps 1e-12)."""
    common = dict(hidden_size=width, num_attention_heads=heads, num_hidden_layers=depth, intermediate_size=4 * width,
                  patch_size=patch, image_size=image, layer_norm_eps=1e-12, **kw)
    return ViTConfig(**common), transformers.ViTConfig(**common, attn_implementation="eager")


def copy_into_hf(ours, theirs, where="", hf_where=None):
    """Put our random weights into transformers' module; every key must map one to one.

    `where` / `hf_where` are the module's places in our / transformers' ViTModel, so the renames see whole keys.
    """
    hf_where = hf_memory_name(where) if hf_where is None else hf_where
    state = {hf_memory_name(where + k)[len(hf_where):]: v for k, v in ours.state_dict().items()}
    assert set(state) == set(theirs.state_dict()), f"keys differ: {set(state) ^ set(theirs.state_dict())}"
    theirs.load_state_dict(state, strict=True)
    return theirs.eval()


@pytest.mark.parametrize("size", SIZES)
def test_embeddings(size):
    ours_cfg, hf_cfg = configs(*size)
    ours = randomize_(ViTEmbeddings(ours_cfg)).eval()
    theirs = copy_into_hf(ours, hf.ViTEmbeddings(hf_cfg))
    x = torch.randn(2, 3, size[4], size[4])
    assert_close(ours(x), theirs(x), "embeddings")


@pytest.mark.parametrize("size", SIZES)
def test_self_attention(size):
    """Our ViTSelfAttention = transformers' ViTAttention with its output projection set to identity."""
    ours_cfg, hf_cfg = configs(*size)
    ours = randomize_(ViTSelfAttention(ours_cfg)).eval()
    theirs = hf.ViTAttention(hf_cfg).eval()
    with torch.no_grad():
        for name in ("query", "key", "value"):
            getattr(theirs, name[0] + "_proj").load_state_dict(getattr(ours, name).state_dict())
        theirs.o_proj.weight.copy_(torch.eye(size[0]))
        theirs.o_proj.bias.zero_()
    x = torch.randn(2, 10, size[0])
    context, probs = ours(x, output_attentions=True)
    ref_context, ref_probs = theirs(x)
    assert_close(context, ref_context, "context")
    assert_close(probs, ref_probs, "attention probabilities")


@pytest.mark.parametrize("size", SIZES)
def test_attention(size):
    ours_cfg, hf_cfg = configs(*size)
    ours = randomize_(ViTAttention(ours_cfg)).eval()
    theirs = copy_into_hf(ours, hf.ViTAttention(hf_cfg), "encoder.layer.0.attention.")
    x = torch.randn(2, 10, size[0])
    out, probs = ours(x, output_attentions=True)
    ref, ref_probs = theirs(x)
    assert_close(out, ref, "attention output")
    assert_close(probs, ref_probs, "attention probabilities")


@pytest.mark.parametrize("size", SIZES)
def test_layer(size):
    ours_cfg, hf_cfg = configs(*size)
    ours = randomize_(ViTLayer(ours_cfg)).eval()
    theirs = copy_into_hf(ours, hf.ViTLayer(hf_cfg), "encoder.layer.0.")
    x = torch.randn(2, 10, size[0])
    assert_close(ours(x)[0], theirs(x), "layer output")


@pytest.mark.parametrize("size", SIZES)
def test_encoder(size):
    """transformers 5 has no ViTEncoder: its ViTModel.layers run one after another is the same thing."""
    ours_cfg, hf_cfg = configs(*size)
    ours = randomize_(ViTEncoder(ours_cfg)).eval()
    theirs = copy_into_hf(ours, torch.nn.ModuleList(hf.ViTLayer(hf_cfg) for _ in range(size[2])), "encoder.", "layers.")
    x = torch.randn(2, 10, size[0])
    out, hidden, _ = ours(x, output_hidden_states=True)
    ref = x
    for i, layer in enumerate(theirs):
        ref = layer(ref)
        assert_close(hidden[i + 1], ref, f"hidden state after layer {i}")
    assert_close(out, ref, "encoder output")


def saved_hf(model, tmp_path):
    """transformers' save_pretrained: its on-disk keys are the contract for ours."""
    model.save_pretrained(tmp_path)
    return load_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize("size", SIZES)
def test_vit_model_with_pooler(size, tmp_path):
    ours_cfg, hf_cfg = configs(*size)
    theirs = randomize_(transformers.ViTModel(hf_cfg)).eval()
    state = saved_hf(theirs, tmp_path)
    ours = ViTModel(ours_cfg).eval()
    assert set(ours.state_dict()) == set(state), f"keys differ: {set(ours.state_dict()) ^ set(state)}"
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, size[4], size[4])
    out = ours(x, output_attentions=True, output_hidden_states=True)
    ref = theirs(x, output_attentions=True, output_hidden_states=True)
    assert_close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    assert_close(out.pooler_output, ref.pooler_output, "pooler_output")
    assert len(out.hidden_states) == len(ref.hidden_states) == size[2] + 1
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(h, r, f"hidden_states[{i}]")
    assert len(out.attentions) == len(ref.attentions) == size[2]
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(a, r, f"attentions[{i}]")


@pytest.mark.parametrize("size", SIZES[:2])
def test_image_classification(size, tmp_path):
    ours_cfg, hf_cfg = configs(*size, num_labels=7)
    theirs = randomize_(transformers.ViTForImageClassification(hf_cfg)).eval()
    state = saved_hf(theirs, tmp_path)
    ours = ViTForImageClassification(ours_cfg).eval()
    assert set(ours.state_dict()) == set(state), f"keys differ: {set(ours.state_dict()) ^ set(state)}"
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, size[4], size[4])
    labels = torch.tensor([1, 6])
    out = ours(x, labels=labels, output_attentions=True, output_hidden_states=True)
    ref = theirs(x, labels=labels, output_attentions=True, output_hidden_states=True)
    assert_close(out.logits, ref.logits, "logits")
    assert_close(out.loss, ref.loss, "loss")
    for i, (h, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(h, r, f"hidden_states[{i}]")
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        assert_close(a, r, f"attentions[{i}]")


def test_state_dict_key_names():
    """The contract's key names, spelled out."""
    cfg, _ = configs(32, 4, 2, 8, 16)
    backbone = set(ViTModel(cfg).state_dict())
    for key in ("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
                "encoder.layer.1.attention.attention.query.weight", "encoder.layer.0.attention.output.dense.weight",
                "encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight",
                "encoder.layer.0.layernorm_before.weight", "layernorm.weight", "pooler.dense.weight"):
        assert key in backbone, key
    classifier = set(ViTForImageClassification(cfg).state_dict())
    assert classifier == {"vit." + k for k in backbone if not k.startswith("pooler.")} | {"classifier.weight", "classifier.bias"}
