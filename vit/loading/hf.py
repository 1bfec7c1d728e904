"""Hugging Face sources: a transformers model folder (ViT, DeiT, DINOv2, DINOv2 with registers) with
its config.json and preprocessor_config.json, and a bare state dict under HF's names.

transformers' other ViT-family folders, keyed by model_type: DeiT has ViT's names under `deit.`
(WithTeacher's cls_classifier is our classifier); Dinov2 names the block's norms and MLP its own way.
Keys these tables don't name are ViT's already and pass through.
"""

import os

from vit.config import ViTConfig
from vit.errors import UserError
from vit.files import read_json
from vit.loading.core import (L, Source, checked_normalization, config_fields, fold_class_position, is_file, read_file,
                              rename, strip_prefixes, tensors_of)

FOLDER = "Hugging Face folder"  # the Source.kind of each
STATE_DICT = "HF-named state dict"

DEIT_RENAMES = [
    (r"cls_classifier\.(weight|bias)", "classifier.\\1", None),
    (r"(.+)", "\\1", None),
]
DINOV2_RENAMES = [
    (r"encoder\.layer\.(\d+)\.norm1\.(weight|bias)", L + "layernorm_before.\\2", None),
    (r"encoder\.layer\.(\d+)\.norm2\.(weight|bias)", L + "layernorm_after.\\2", None),
    (r"encoder\.layer\.(\d+)\.mlp\.fc1\.(weight|bias)", L + "intermediate.dense.\\2", None),
    (r"encoder\.layer\.(\d+)\.mlp\.fc2\.(weight|bias)", L + "output.dense.\\2", None),
    (r"(.+)", "\\1", None),
]

# model_type -> (the prefix of a classifier's backbone keys, the rename table into our names)
HF_FAMILY = {
    "vit": ("vit.", None),
    "deit": ("deit.", DEIT_RENAMES),
    "dinov2": ("", DINOV2_RENAMES),
    "dinov2_with_registers": ("", DINOV2_RENAMES),
}


def read_hf_folder(path: str) -> Source:
    """config.json plus model.safetensors / pytorch_model.bin (or a sharded index) from transformers,
    and the normalization its preprocessor_config.json states."""
    config_path = os.path.join(path, "config.json")
    if not is_file(config_path):
        raise UserError(f"folder {path} has no config.json; pass a Hugging Face model folder or a checkpoint file.")
    hf_config = read_json(config_path, "config file", "re-save the model folder or fix it")
    try:
        config = ViTConfig.from_hf_dict(family_fields(hf_config))
    except (TypeError, AttributeError, ValueError) as e:  # UserError is a ValueError
        raise UserError(f"config file {config_path} is not a valid ViT config.json ({e}); re-save it or fix it.") from None
    model_type = hf_config.get("model_type", "vit")
    if model_type not in HF_FAMILY:
        raise UserError(f"config file {config_path} is for model_type={model_type!r}, not one of {list(HF_FAMILY)}; pass a ViT, DeiT or DINOv2 model folder.")
    if hf_config.get("use_swiglu_ffn"):
        raise UserError(f"config file {config_path} has use_swiglu_ffn=true (DINOv2 giant's SwiGLU MLP), which this ViT has no counterpart for; pass a DINOv2 S, B or L folder.")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if is_file(os.path.join(path, index)):
            listing = read_json(os.path.join(path, index), "shard index", "re-save the model folder")
            try:
                files = sorted(set(listing["weight_map"].values()))
            except (KeyError, TypeError, AttributeError) as e:
                raise UserError(f"shard index {os.path.join(path, index)} is not valid ({type(e).__name__}: {e}); re-save the model folder.") from None
            missing = [n for n in files if not is_file(os.path.join(path, n))]
            if missing:
                raise UserError(f"folder {path} lacks the shard {missing[0]} that {index} lists; copy the whole model folder.")
            break
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if is_file(os.path.join(path, n))][:1]
    if not files:
        raise UserError(f"folder {path} has no model.safetensors or pytorch_model.bin; the weights are missing.")
    state = {}
    for name in files:
        file = os.path.join(path, name)
        state.update(tensors_of(read_file(file), file))
    prefix, table = HF_FAMILY[model_type]
    state = strip_prefixes(state, (prefix,)) if prefix else state
    if table is not None:
        state = rename(state, table, path)
    if model_type == "dinov2_with_registers":
        state = fold_class_position(state)
    return Source(state, config_fields(config, state, path, f"folder {path}: config.json"), FOLDER,
                  read_normalization(path))


def family_fields(hf_config):
    """transformers' DeiT and Dinov2 config.json bodies in ViTConfig's fields (a ViT one as it is)."""
    model_type = hf_config.get("model_type", "vit")
    d = dict(hf_config)
    if model_type == "deit":
        d["distilled"] = True  # every DeiT model carries the distillation token, with or without its head
    elif model_type in ("dinov2", "dinov2_with_registers"):
        d["intermediate_size"] = int(d.get("hidden_size", 768) * d.get("mlp_ratio", 4))
        d["layer_scale_init"] = d.get("layerscale_value", 1.0)
        d["no_embed_class"] = model_type == "dinov2_with_registers"  # see fold_class_position
    return d


def read_normalization(folder):
    """{"mean", "std"} from an HF folder's preprocessor_config.json, or {} where it states none."""
    pre = os.path.join(folder, "preprocessor_config.json")
    if not is_file(pre):
        return {}
    cfg = read_json(pre, "file", "fix it, or delete it to use mean and std 0.5")
    if isinstance(cfg, dict) and "image_mean" in cfg and "image_std" in cfg:
        return checked_normalization(cfg["image_mean"], cfg["image_std"], f"file {pre}: image_mean/image_std")
    return {}


def from_hf_state(state: dict, notes: list) -> Source:
    """A torch file of HF-named tensors (`vit.` already stripped) without a config: the architecture
    comes from the shapes, and HF's own LayerNorm eps default (1e-12) stands, said in the report."""
    return Source(state, {}, STATE_DICT, notes=[*notes, "no config in the file: layer_norm_eps is HF's default 1e-12 unless overridden"])
