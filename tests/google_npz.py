"""Test-side writer of Google JAX .npz checkpoints, from a timm VisionTransformer's state dict.

Writes the key names and layouts of the three Google forms (the inverse of vit/loading/npz.py's
rules, written independently from timm's `_load_weights` so the two can be checked against it):
- "original": the first imagenet21k release (google-research/vision_transformer), optionally
  with the `pre_logits` representation layer;
- "augreg": the same names without pre_logits;
- "big_vision": `params/` prefix, MultiHeadDotProductAttention_0 / MlpBlock_0 / LayerNorm_0/1,
  top-level `pos_embedding`; `scan=True` stacks the blocks under one `encoderblock/` with a depth
  axis; `pos_without_cls=True` stores only the patch positions, as big_vision's own ViT does.
"""

import numpy as np

NAMES = {
    "original": dict(prefix="", mha="MultiHeadDotProductAttention_1", mlp="MlpBlock_3", ln2="LayerNorm_2", pos="Transformer/posembed_input/pos_embedding"),
    "augreg": dict(prefix="", mha="MultiHeadDotProductAttention_1", mlp="MlpBlock_3", ln2="LayerNorm_2", pos="Transformer/posembed_input/pos_embedding"),
    "big_vision": dict(prefix="params/", mha="MultiHeadDotProductAttention_0", mlp="MlpBlock_0", ln2="LayerNorm_1", pos="pos_embedding"),
}


def to_google(state, num_heads, form="augreg", pre_logits=None, scan=False, pos_without_cls=False):
    """{google key: float32 array} from timm keys; pre_logits is an optional (weight, bias) pair."""
    n = NAMES[form]
    a = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    width = state["cls_token"].shape[-1]
    head_dim = width // num_heads
    pos = a(state["pos_embed"])
    out = {
        "embedding/kernel": a(state["patch_embed.proj.weight"]).transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": a(state["patch_embed.proj.bias"]),
        "cls": a(state["cls_token"]),
        n["pos"]: pos[:, 1:] if pos_without_cls else pos,
        "Transformer/encoder_norm/scale": a(state["norm.weight"]),
        "Transformer/encoder_norm/bias": a(state["norm.bias"]),
    }
    if "head.weight" in state:
        out["head/kernel"] = a(state["head.weight"]).T
        out["head/bias"] = a(state["head.bias"])
    if pre_logits is not None:
        out["pre_logits/kernel"] = a(pre_logits[0]).T
        out["pre_logits/bias"] = a(pre_logits[1])
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    blocks = []
    for i in range(depth):
        s = lambda name: a(state[f"blocks.{i}.{name}"])  # noqa: E731
        b = {
            "LayerNorm_0/scale": s("norm1.weight"),
            "LayerNorm_0/bias": s("norm1.bias"),
            f"{n['ln2']}/scale": s("norm2.weight"),
            f"{n['ln2']}/bias": s("norm2.bias"),
            f"{n['mha']}/out/kernel": s("attn.proj.weight").T.reshape(num_heads, head_dim, width),
            f"{n['mha']}/out/bias": s("attn.proj.bias"),
            f"{n['mlp']}/Dense_0/kernel": s("mlp.fc1.weight").T,
            f"{n['mlp']}/Dense_0/bias": s("mlp.fc1.bias"),
            f"{n['mlp']}/Dense_1/kernel": s("mlp.fc2.weight").T,
            f"{n['mlp']}/Dense_1/bias": s("mlp.fc2.bias"),
        }
        qkv_w, qkv_b = np.split(s("attn.qkv.weight"), 3), np.split(s("attn.qkv.bias"), 3)
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            b[f"{n['mha']}/{name}/kernel"] = w.T.reshape(width, num_heads, head_dim)  # (D, heads, head_dim)
            b[f"{n['mha']}/{name}/bias"] = bias.reshape(num_heads, head_dim)
        blocks.append(b)
    if scan:
        out.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        out.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    return {n["prefix"] + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_npz(path, state, num_heads, form="augreg", **kw):
    """Write `to_google(...)` to `path` as an uncompressed .npz, the way the released files are."""
    np.savez(path, **to_google(state, num_heads, form, **kw))
    return path


# -----------------------------------------------------------------------------
# small random reference models shared by the model tests


def timm_vit(width=32, depth=2, heads=4, image_size=32, patch=8, classes=10, mlp_ratio=4.0, **kw):
    """A tiny timm VisionTransformer in eval mode with every parameter random (no zero heads or unit norms)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=image_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=mlp_ratio, num_classes=classes, **kw,
    ).eval()
    randomize_(model)
    return model


def randomize_(model, std=0.2):
    """Fill every parameter with N(0, std) noise (norm scales around 1) so no mapping mistake hides."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "layernorm_before.weight", "layernorm_after.weight", "layernorm.weight")) else 0.0, std)
    return model
