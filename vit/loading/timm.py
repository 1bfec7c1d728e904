"""timm sources: a state-dict file of timm's VisionTransformer (`.pth`, `.bin`, `.safetensors`, the
`.pth.tar` its train.py writes), bare or wrapped; the family's variants as far as the model has their
switches (DeiT, DeiT III, DINOv2, CLIP, MAE, gap models).

References: timm's `checkpoint_filter_fn` (models/vision_transformer.py); transformers'
`convert_vit_timm_to_pytorch.py`, whose rename table this one follows.
"""

from vit.loading.core import L, Source, fold_class_position, rename

KIND = "timm state dict"  # the Source.kind
KEY = "patch_embed.proj.weight"  # the tensor every timm ViT file has and no other source names so

TIMM_RENAMES = [
    (r"cls_token", "embeddings.cls_token", None),
    (r"dist_token", "embeddings.distillation_token", None),  # DeiT distilled
    (r"reg_token", "embeddings.register_tokens", None),  # DINOv2 with registers
    (r"register_tokens", "embeddings.register_tokens", None),  # DINOv2's own files, see fold_class_position
    (r"mask_token", "embeddings.mask_token", None),  # DINOv2's own files: masked pre-training only, so ignored
    (r"pos_embed", "embeddings.position_embeddings", None),
    (r"patch_embed\.proj\.(weight|bias)", "embeddings.patch_embeddings.projection.\\1", None),
    (r"norm_pre\.(weight|bias)", "norm_pre.\\1", None),  # CLIP
    (r"blocks\.(\d+)\.ls([12])\.gamma", L + "layer_scale\\2.lambda1", None),  # DeiT III, DINOv2
    (r"blocks\.(\d+)\.gamma_([12])", L + "layer_scale\\2.lambda1", None),  # DeiT III's own files
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", L + "layernorm_before.\\2", None),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", L + "attention.attention.{q,k,v}.\\2", "split_qkv"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", L + "attention.output.dense.\\2", None),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", L + "layernorm_after.\\2", None),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", L + "intermediate.dense.\\2", None),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", L + "output.dense.\\2", None),
    (r"norm\.(weight|bias)", "layernorm.\\1", None),
    (r"fc_norm\.(weight|bias)", "fc_norm.\\1", None),  # the final norm after pooling (gap models, MAE fine-tuning)
    (r"pre_logits\.fc\.(weight|bias)", "pooler.dense.\\1", None),  # old timm's representation layer
    (r"head\.(weight|bias)", "classifier.\\1", None),
    (r"head_dist\.(weight|bias)", "distillation_classifier.\\1", None),  # DeiT distilled
]

CLIP_NOTE = ("norm_pre (CLIP): layer_norm_eps=1e-5 and hidden_act='gelu' assumed, as in timm's *_clip_* models; "
             "OpenAI's own weights (timm's *_clip_quickgelu_*) need hidden_act='quick_gelu'")


def from_timm_state(state: dict, path: str, notes: list) -> Source:
    """A timm state dict (wrappers and DDP / compile prefixes already stripped) under our names, with
    timm's LayerNorm eps: 1e-6, or CLIP's 1e-5 for its pre-norm models."""
    renamed = rename(state, TIMM_RENAMES, path)
    if "register_tokens" in state:  # DINOv2's own naming: its class token has a position, its registers none
        renamed = fold_class_position(renamed)
    if "norm_pre.weight" in renamed:  # timm's pre-norm models are the CLIP family, with CLIP's LayerNorm eps
        return Source(renamed, {"layer_norm_eps": 1e-5}, KIND, notes=[CLIP_NOTE, *notes])
    return Source(renamed, {"layer_norm_eps": 1e-6}, KIND, notes=notes)
