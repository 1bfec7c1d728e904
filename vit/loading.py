"""Load weights into our ViT: Hugging Face folders, timm state-dict files, Google .npz, and this
project's own training checkpoints (last.pt / best.pt) and run folders. The only place that reads
weight files: resume reads last.pt through `read_training_checkpoint` here too.

Every source is first turned into one flat dict of torch tensors under *our* key names (the HF
names, without the `vit.` prefix) by a rename table plus explicit transpose rules. Then one copy
loop, nanoGPT-style, checks every shape and reports what was mapped, initialised fresh or ignored.

A new image, patch or channel count is fitted with `vit/resize.py`. The model classes call in
through `from_pretrained(path)`, passing themselves: this file builds them, and imports no model.

References: timm's `_load_weights` and `checkpoint_filter_fn` (models/vision_transformer.py);
transformers' `convert_vit_timm_to_pytorch.py`; big_vision's models/vit.py for the `params/` naming.
"""

import argparse
import json
import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from vit.config import SWITCHES, ViTConfig
from vit.errors import UserError, special_file_kind
from vit.resize import adapt_input_channels, resample_patch_kernel, resample_pos_embed

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pth.tar")  # .pth.tar: timm's train.py
HEADS = ("classifier.", "distillation_classifier.")  # a classifier's heads, outside its `vit.` backbone
# standard head count per width (the paper's Table 1 and DeiT); anything else needs an override
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# -----------------------------------------------------------------------------
# rename tables: (source regex, our key, transpose rule). our keys are the HF ones without `vit.`.

L = "encoder.layer.\\1."
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

# transformers' other ViT-family folders, keyed by model_type: DeiT has ViT's names under `deit.`
# (WithTeacher's cls_classifier is our classifier); Dinov2 names the block's norms and MLP its own way.
# Keys these tables don't name are ViT's already and pass through.
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

# tensors of ViT variants this model has no layout for, refused by name rather than dropped
UNSUPPORTED = [
    (r"attn_pool\..*|MAPHead_0/.*", "an attention-pooling head (SigLIP's global_pool='map')"),
    (r".*\.(q_norm|k_norm)\..*", "qk-norm"),
    (r".*\.mlp\.(fc1_g|fc1_x|w12|w3|weights_in|weights_out)\..*", "a SwiGLU MLP"),
    (r".*\.(attn|mlp)\.norm\..*", "a norm inside attention or the MLP (timm's scale_attn_norm / scale_mlp_norm)"),
    (r"patch_embed\.norm\..*", "a norm after the patch embedding"),
]

# Google names after the `params/` or `opt/target/` prefix is stripped. The first release and AugReg
# call the block's parts MultiHeadDotProductAttention_1, MlpBlock_3, LayerNorm_0/2; big_vision
# calls them ..._0, MlpBlock_0, LayerNorm_0/1. Flax kernels are (in, out), attention ones split heads.
B = r"Transformer/encoderblock_(\d+)/"
NPZ_RENAMES = [
    (r"cls", "embeddings.cls_token", None),
    (r"(?:Transformer/posembed_input/)?pos_embedding", "embeddings.position_embeddings", None),
    (r"embedding/kernel", "embeddings.patch_embeddings.projection.weight", "hwio_to_oihw"),
    (r"embedding/bias", "embeddings.patch_embeddings.projection.bias", None),
    (B + r"LayerNorm_0/scale", L + "layernorm_before.weight", None),
    (B + r"LayerNorm_0/bias", L + "layernorm_before.bias", None),
    (B + r"MultiHeadDotProductAttention_[01]/(query|key|value)/kernel", L + "attention.attention.\\2.weight", "heads_in"),
    (B + r"MultiHeadDotProductAttention_[01]/(query|key|value)/bias", L + "attention.attention.\\2.bias", "flatten"),
    (B + r"MultiHeadDotProductAttention_[01]/out/kernel", L + "attention.output.dense.weight", "heads_out"),
    (B + r"MultiHeadDotProductAttention_[01]/out/bias", L + "attention.output.dense.bias", None),
    (B + r"LayerNorm_[12]/scale", L + "layernorm_after.weight", None),
    (B + r"LayerNorm_[12]/bias", L + "layernorm_after.bias", None),
    (B + r"MlpBlock_[03]/Dense_0/kernel", L + "intermediate.dense.weight", "transpose"),
    (B + r"MlpBlock_[03]/Dense_0/bias", L + "intermediate.dense.bias", None),
    (B + r"MlpBlock_[03]/Dense_1/kernel", L + "output.dense.weight", "transpose"),
    (B + r"MlpBlock_[03]/Dense_1/bias", L + "output.dense.bias", None),
    (r"Transformer/encoder_norm/scale", "layernorm.weight", None),
    (r"Transformer/encoder_norm/bias", "layernorm.bias", None),
    (r"pre_logits/kernel", "pooler.dense.weight", "transpose"),
    (r"pre_logits/bias", "pooler.dense.bias", None),
    (r"head/kernel", "classifier.weight", "transpose"),
    (r"head/bias", "classifier.bias", None),
]

TRANSPOSES = {
    None: lambda t: t,
    "transpose": lambda t: t.t(),  # dense (in, out) -> Linear (out, in)
    "hwio_to_oihw": lambda t: t.permute(3, 2, 0, 1),  # conv (kh, kw, in, out) -> (out, in, kh, kw)
    "heads_in": lambda t: t.reshape(t.shape[0], -1).t(),  # q/k/v (D, heads, head_dim) -> (D, D)
    "heads_out": lambda t: t.reshape(-1, t.shape[-1]).t(),  # out (heads, head_dim, D) -> (D, D)
    "flatten": lambda t: t.reshape(-1),  # q/k/v bias (heads, head_dim) -> (D,)
}
RANKS = {"transpose": 2, "hwio_to_oihw": 4, "heads_in": 3, "heads_out": 3, "flatten": 2}  # what each rule takes


def rename(state, table, path):
    """Apply a rename table to every tensor; a key that matches no rule is refused, not dropped."""
    out = {}
    for key, tensor in state.items():
        for pattern, target, rule in table:
            m = re.fullmatch(pattern, key)
            if m is None:
                continue
            want = RANKS.get(rule)
            if tensor.ndim == 0 or tensor.ndim != (want or tensor.ndim):
                where = f"a {want}-D tensor" if want else "a tensor, not a scalar"
                raise UserError(f"checkpoint {path} has tensor {key!r} of shape {tuple(tensor.shape)}, where a ViT "
                                f"has {where}; the file is damaged or not a ViT checkpoint.")
            if rule == "split_qkv":  # timm's fused (3D, D) qkv -> query, key, value
                for name, part in zip(("query", "key", "value"), tensor.chunk(3)):
                    out[m.expand(target.replace("{q,k,v}", name))] = part
            else:
                out[m.expand(target)] = TRANSPOSES[rule](tensor)
            break
        else:
            what = next((what for pattern, what in UNSUPPORTED if re.fullmatch(pattern, key)), None)
            if what is not None:
                raise UserError(f"checkpoint {path} has tensor {key!r}, part of {what}, which this ViT has no counterpart for; "
                                f"pass a checkpoint of the plain ViT family (see the README's list).")
            raise UserError(
                f"checkpoint {path} has tensor {key!r} with no counterpart in this ViT; it takes the plain ViT "
                f"family only (class/register/distillation tokens, layer scale, pre-norm, fc_norm; see the README)."
            )
    return out


# -----------------------------------------------------------------------------
# the one safe reader of torch files, and this project's own training checkpoints

BEST, LAST = "best.pt", "last.pt"  # a run folder's checkpoints, written by vit/train/checkpoint.py
TRAINING_CHECKPOINT = "training checkpoint"  # a Source.kind
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's, on a wrapped model's keys
# where a file keeps an exponential moving average of its weights: DeiT's and this project's, timm's train.py's
EMA_KEYS = ("model_ema", "state_dict_ema")
# the one class a weights_only load may rebuild besides tensors and plain types: timm's train.py saves
# its argparse arguments as `args` (timm reads its own files the same way); anything else is refused
SAFE_GLOBALS = [argparse.Namespace]


def is_file(path):
    """os.path.isfile, except that a FIFO, device or socket is refused by name before anything opens it."""
    kind = special_file_kind(path)
    if kind is not None:
        raise UserError(f"checkpoint {path} is {kind}, not a regular file; pass a checkpoint file or folder.")
    return os.path.isfile(path)


def read_file(path):
    """What a .safetensors, .pth, .pt, .bin, .ckpt or .pth.tar file holds, read without running code
    from it: safetensors, or torch.load(weights_only=True) with only SAFE_GLOBALS allowed. The
    project's only reader of torch files."""
    if not is_file(path):
        raise UserError(f"checkpoint {path} does not exist; check the path.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        with torch.serialization.safe_globals(SAFE_GLOBALS):  # for this load only, not process-wide
            return torch.load(path, map_location="cpu", weights_only=True)
    # a corrupt, truncated or hostile file can fail anywhere in the zip / pickle / header layers
    except Exception as e:  # noqa: BLE001
        unsafe = "Weights only load failed" in str(e)
        reason = "it holds pickled objects that could run code" if unsafe else "it is corrupt, truncated or not a checkpoint"
        raise UserError(f"cannot read checkpoint {path}: {reason} ({type(e).__name__}); use a state-dict file saved with torch.save or safetensors.") from None


def is_training_checkpoint(obj):
    """This project's last.pt / best.pt: the weights under `model`, their config beside them."""
    return isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in ("model", "config"))


def read_training_checkpoint(path):
    """All of a run's last.pt or best.pt (weights, optimizer, RNG states, progress); anything else is refused."""
    obj = read_file(path)
    if not is_training_checkpoint(obj):
        raise UserError(f"checkpoint {path} is not a training checkpoint of this project (no model/config entries); pass a run's last.pt or best.pt.")
    return obj


def run_checkpoint(path):
    """A run folder stands for its best.pt (else its last.pt); any other path for itself."""
    if os.path.isdir(path):
        for name in (BEST, LAST):
            if is_file(os.path.join(path, name)):
                return os.path.join(path, name)
    return path


def tensors_of(obj, path, ema=False):
    """The flat dict of tensors in what read_file returned: bare, or under `model` / `state_dict`;
    with ema=True the EMA weights under `model_ema` / `state_dict_ema`, which must be there."""
    if ema:
        key = next((k for k in EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if key is None:
            raise UserError(f"checkpoint {path} holds no EMA weights ({' or '.join(EMA_KEYS)}); load it without asking for them.")
        obj = obj[key]
    for wrapper in ("model", "state_dict"):  # training checkpoints and some timm files wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefixes(state, prefixes):
    """Drop wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`, HF's `vit.`) wherever they lead."""
    out = {}
    for k, v in state.items():
        while k.startswith(prefixes):
            k = k[len(next(p for p in prefixes if k.startswith(p))):]
        out[k] = v
    return out


# -----------------------------------------------------------------------------
# readers: each turns one kind of file into a Source


@dataclass
class Source:
    """What a checkpoint path holds: its tensors under our names, the config fields it states, what
    kind of file it is, and what it carries beyond the weights for inference (`extras`: mean and std,
    a training run's params); `notes` are what the reader assumed, for the load report."""

    state: dict
    config: dict
    kind: str
    extras: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def read_hf_folder(path):
    """config.json plus model.safetensors / pytorch_model.bin (or a sharded index) from transformers,
    and the normalization its preprocessor_config.json states."""
    config_path = os.path.join(path, "config.json")
    if not is_file(config_path):
        raise UserError(f"folder {path} has no config.json; pass a Hugging Face model folder or a checkpoint file.")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
        config = ViTConfig.from_hf_dict(family_fields(hf_config))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError, ValueError, UserError) as e:
        raise UserError(f"config file {config_path} is not a valid ViT config.json ({e}); re-save it or fix it.") from None
    model_type = hf_config.get("model_type", "vit")
    if model_type not in HF_FAMILY:
        raise UserError(f"config file {config_path} is for model_type={model_type!r}, not one of {list(HF_FAMILY)}; pass a ViT, DeiT or DINOv2 model folder.")
    if hf_config.get("use_swiglu_ffn"):
        raise UserError(f"config file {config_path} has use_swiglu_ffn=true (DINOv2 giant's SwiGLU MLP), which this ViT has no counterpart for; pass a DINOv2 S, B or L folder.")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if is_file(os.path.join(path, index)):
            try:
                with open(os.path.join(path, index)) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
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
    return Source(state, config_fields(config, state, path, f"folder {path}: config.json"), "Hugging Face folder",
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


def fold_class_position(state):
    """DINOv2 with registers gives the class token a position but not the registers: add that
    position to the class token once, leaving positions for the patches only (no_embed_class), as
    timm's conversion does. Exact: the class token and its position are both constants."""
    if "embeddings.position_embeddings" not in state or "embeddings.cls_token" not in state:
        return state  # incomplete: infer_config names what is missing
    pos = state["embeddings.position_embeddings"]  # (1, 1+N, D)
    state["embeddings.cls_token"] = state["embeddings.cls_token"] + pos[:, :1]
    state["embeddings.position_embeddings"] = pos[:, 1:]
    return state


CLIP_NOTE = ("norm_pre (CLIP): layer_norm_eps=1e-5 and hidden_act='gelu' assumed, as in timm's *_clip_* models; "
             "OpenAI's own weights (timm's *_clip_quickgelu_*) need hidden_act='quick_gelu'")


def read_normalization(folder):
    """{"mean", "std"} from an HF folder's preprocessor_config.json, or {} where it states none."""
    pre = os.path.join(folder, "preprocessor_config.json")
    if not is_file(pre):
        return {}
    try:
        with open(pre) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"file {pre} is not valid JSON ({type(e).__name__}); fix it or delete it to use mean/std 0.5.") from None
    if isinstance(cfg, dict) and "image_mean" in cfg and "image_std" in cfg:
        return checked_normalization(cfg["image_mean"], cfg["image_std"], f"file {pre}: image_mean/image_std")
    return {}


def checked_normalization(mean, std, where):
    """{"mean", "std"} as lists of floats (HF allows one number for all channels), refused unless finite
    numbers with std > 0: a file's values, read before anything is normalized with them."""
    mean, std = ([v] if isinstance(v, (int, float)) else v for v in (mean, std))
    for name, values in (("mean", mean), ("std", std)):
        if (not isinstance(values, (list, tuple)) or not values or len(values) > 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            raise UserError(f"{where} has {name} {str(values)[:80]}, not a list of 1 to 4 finite numbers; fix the file.")
    if min(std) <= 0:
        raise UserError(f"{where} has std {list(std)} with a value <= 0; fix the file.")
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def config_fields(config, state, path, where):
    """The config's fields, refused where they contradict the tensors: a wrong config would otherwise
    be "fixed" by resampling or a fresh head."""
    kw = {f.name: getattr(config, f.name) for f in fields(config)}
    for key, value in infer_config(state, path).items():
        stated = kw[key]
        if key == "layer_scale_init":  # the tensors tell whether there is layer scale, not its init value
            key, stated, value = "layer scale", stated is not None, value is not None
        if key not in GUESSED and stated != value:  # heads and pooling: the shapes only guess them
            raise UserError(f"{where} has {key}={stated!r} but the weights have {key}={value!r}; fix the config to match the weights.")
    return kw


def read_state_file(path, ema=False):
    """A timm (or HF-named) state-dict file, or this project's training checkpoint with its config,
    normalization and params; the keys tell which. ema=True takes the file's EMA weights."""
    obj = read_file(path)
    # ours says model_type "vit"; a foreign {"model", "config"} file (a training script's arguments) is read by its shapes
    ours = is_training_checkpoint(obj) and obj["config"].get("model_type") == "vit"
    config = obj["config"] if ours else None
    state = strip_prefixes(tensors_of(obj, path, ema), WRAPPER_PREFIXES)
    notes = []
    if ema:
        notes.append("the EMA weights, as asked")
    elif isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in EMA_KEYS):
        key = next(k for k in EMA_KEYS if isinstance(obj.get(k), dict))
        notes.append(f"the file also holds EMA weights ({key}): from_pretrained(..., ema=True) or --ema loads those")
    if "patch_embed.proj.weight" in state:
        renamed = rename(state, TIMM_RENAMES, path)
        if "register_tokens" in state:  # DINOv2's own naming: its class token has a position, its registers none
            renamed = fold_class_position(renamed)
        if "norm_pre.weight" in renamed:  # timm's pre-norm models are the CLIP family, with CLIP's LayerNorm eps
            return Source(renamed, {"layer_norm_eps": 1e-5}, "timm state dict", notes=[CLIP_NOTE, *notes])
        return Source(renamed, {"layer_norm_eps": 1e-6}, "timm state dict", notes=notes)
    state = strip_prefixes(state, ("vit.",))
    if "embeddings.patch_embeddings.projection.weight" in state:
        if config is None:
            return Source(state, {}, "HF-named state dict", notes=notes)  # no config: HF's own eps default (1e-12) stands
        try:
            known = ViTConfig.from_hf_dict(config)
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"checkpoint {path} carries a config this model cannot read ({e}); pass its best_hf folder instead.") from None
        extras = run_extras(obj, path)
        return Source(state, config_fields(known, state, path, f"checkpoint {path}: its config"), TRAINING_CHECKPOINT, extras, notes)
    raise UserError(
        f"checkpoint {path} is not a recognised ViT state dict (no patch_embed.proj.weight or "
        f"embeddings.patch_embeddings.projection.weight); pass a timm or Hugging Face ViT checkpoint."
    )


def run_extras(obj, path):
    """What a training checkpoint carries for inference (mean and std, the run's params), each checked:
    a wrong type here would fail later, far from the file."""
    extras = {}
    if "mean" in obj or "std" in obj:
        extras.update(checked_normalization(obj.get("mean"), obj.get("std"), f"checkpoint {path}"))
    params = obj.get("params")
    if params is not None:
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            raise UserError(f"checkpoint {path} carries params that are not sections of keys ({str(params)[:80]}); "
                            f"it is damaged or not this project's: pass its best_hf folder instead.")
        extras["params"] = params
    return extras


def read_npz(path):
    """An original Google JAX/Flax .npz (first in21k release, AugReg, or big_vision), without pickle."""
    try:
        with zipfile.ZipFile(path) as z:
            arrays = {}
            for info in z.infolist():
                check_npy_header(z, info)  # before numpy allocates what the header declares
                with z.open(info) as member:
                    arrays[info.filename.removesuffix(".npy")] = np.lib.format.read_array(member, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error, NotImplementedError) as e:
        raise UserError(f"cannot read {path} as a .npz checkpoint ({type(e).__name__}: {str(e)[:200]}); the file is corrupt, truncated or pickled.") from None
    for prefix in ("params/", "opt/target/"):
        if prefix + "embedding/kernel" in arrays:
            arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if "embedding/kernel" not in arrays:
        raise UserError(f"{path} is not a recognised Google ViT .npz (no embedding/kernel); pass a ViT checkpoint.")
    arrays = unstack_scanned_blocks(arrays, path)
    state = rename({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}, NPZ_RENAMES, path)
    # Google's ViTs have a class token only to pool with it (big_vision's pool_type='tok'); else they pool by the mean
    kw = {"layer_norm_eps": 1e-6, "global_pool": "token" if "embeddings.cls_token" in state else "avg"}
    query = arrays.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if query is None:
        query = arrays.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
    if query is not None:
        kw["num_attention_heads"] = int(query.shape[1])  # (D, heads, head_dim)
    pos = state.get("embeddings.position_embeddings")
    if pos is not None and pos.ndim == 3 and "embeddings.cls_token" in state and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # big_vision adds position embeddings before the cls token joins: its position is zero
        state["embeddings.position_embeddings"] = torch.cat((pos.new_zeros(1, 1, pos.shape[2]), pos), dim=1)
    return Source(state, kw, "Google .npz")


def check_npy_header(z, info):
    """ValueError for an .npy member whose header declares more (or other) data than the member holds:
    numpy would allocate the declared size first (10^12 floats for a 64-byte member), then find the data short."""
    with z.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"member {info.filename!r} is .npy format {version}, which numpy's savez does not write")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(member)
        data_bytes = info.file_size - member.tell()
    if dtype.hasobject:
        raise ValueError(f"member {info.filename!r} holds pickled objects, which are never loaded")
    declared = math.prod(shape) * dtype.itemsize
    if declared != data_bytes:
        raise ValueError(f"member {info.filename!r} declares shape {shape} of {dtype}, {declared:,} bytes, but holds {data_bytes:,}")


def unstack_scanned_blocks(arrays, path):
    """big_vision's scanned encoder stores all blocks in one `encoderblock/` with a leading depth axis."""
    out = {}
    for k, v in arrays.items():
        if k.startswith("Transformer/encoderblock/"):
            if v.ndim == 0:
                raise UserError(f"{path}: the scanned block array {k!r} is a scalar, not a stack of blocks; the file is damaged or not a ViT checkpoint.")
            for i in range(v.shape[0]):
                out[k.replace("encoderblock/", f"encoderblock_{i}/")] = v[i]
        else:
            out[k] = v
    return out


# -----------------------------------------------------------------------------
# architecture from shapes


def infer_config(state, path):
    """Width, depth, MLP width, patch, grid and channels from the tensors themselves, and the ViT-family
    switches from which tensors exist (see infer_switches)."""
    need = ("embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings", "encoder.layer.0.intermediate.dense.weight")
    for key, rank in zip(need, (4, 3, 2)):
        if key not in state:
            raise UserError(f"checkpoint {path} lacks {key!r}, so its architecture cannot be read; pass a complete ViT checkpoint.")
        if state[key].ndim != rank:
            raise UserError(f"checkpoint {path} has {key!r} of shape {tuple(state[key].shape)}, where a ViT has a {rank}-D tensor; "
                            f"the file is damaged or not a ViT checkpoint.")
    kernel = state[need[0]]  # (D, C, p, p)
    width, channels, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    fc2 = state.get("encoder.layer.0.output.dense.weight")  # (D, intermediate)
    if fc2 is not None and fc2.shape[1] != state[need[2]].shape[0]:
        raise UserError(f"checkpoint {path} has an MLP whose first layer gives {state[need[2]].shape[0]} features and whose second takes "
                        f"{fc2.shape[1]}: a packed SwiGLU MLP (timm's SwiGLUPacked), which this ViT has no counterpart for.")
    switches = infer_switches(state, path)
    positions = state[need[1]].shape[1]  # (1, prefix tokens + grid^2, D), or grid^2 with no_embed_class
    patches = positions - (0 if switches["no_embed_class"] else num_prefix(switches))
    if patches < 1:
        raise UserError(f"checkpoint {path} has position embeddings for {positions} token(s), none left for a patch; "
                        f"the file is damaged or not a ViT checkpoint.")
    grid = math.isqrt(patches)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    heads = STANDARD_HEADS.get(width)
    kw = dict(
        hidden_size=width, num_hidden_layers=depth, intermediate_size=state[need[2]].shape[0],
        patch_size=patch, image_size=grid * patch, num_channels=channels,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
    )
    if heads is not None:
        kw["num_attention_heads"] = heads
    if "classifier.weight" in state:
        kw["num_labels"] = state["classifier.weight"].shape[0]
    return {**kw, **switches}


LAYER_SCALE_FOUND = 1e-5  # the files hold the learned scales, not their init; this stands in for it (DINOv2's)
GUESSED = ("num_attention_heads", "global_pool")  # fields the tensors cannot pin down


def num_prefix(switches):
    return int(switches["class_token"]) + int(switches["distilled"]) + switches["num_register_tokens"]


def infer_switches(state, path):
    """The ViT-family switches (vit/config.py) from which tensors the file has.

    Only the pooling can hide: a class-token file without fc_norm may be a timm model made with
    global_pool='avg', fc_norm=False, which saves the same keys. 'token' is assumed there (and 'avg'
    with fc_norm, timm's default pairing); the load report says so and global_pool= overrides it.
    """
    registers = state.get("embeddings.register_tokens")
    sw = dict(
        class_token="embeddings.cls_token" in state,
        distilled="embeddings.distillation_token" in state,
        num_register_tokens=registers.shape[1] if registers is not None else 0,
        layer_scale_init=LAYER_SCALE_FOUND if "encoder.layer.0.layer_scale1.lambda1" in state else None,
        pre_norm="norm_pre.weight" in state,
        fc_norm="fc_norm.weight" in state,
    )
    sw["global_pool"] = "token" if sw["class_token"] and not sw["fc_norm"] else "avg"
    if sw["pre_norm"] and "embeddings.patch_embeddings.projection.bias" in state:
        raise UserError(f"checkpoint {path} has both norm_pre and a patch-embedding bias, a pairing this ViT (like timm's) cannot build; "
                        f"pass a checkpoint with one or the other.")
    # positions for the prefix tokens too (classic), or for the patches only (no_embed_class): the
    # patches must fill a square grid. Both can only fit at grids of 3 or less; classic wins there.
    length, prefix = state["embeddings.position_embeddings"].shape[1], num_prefix(sw)
    if length > prefix and math.isqrt(length - prefix) ** 2 == length - prefix:
        sw["no_embed_class"] = False
    elif prefix and math.isqrt(length) ** 2 == length:
        sw["no_embed_class"] = True
    else:
        raise UserError(f"checkpoint {path} has {length} position embeddings for {prefix} prefix token(s), which leaves no square patch grid; "
                        f"pass a ViT checkpoint with square images.")
    return sw


# -----------------------------------------------------------------------------
# the load itself


@dataclass
class LoadReport:
    """What a load did, kept on the model as `model.load_report` and printed once; `extras` is what
    the file carried beyond the weights (see Source), for `inference_info`."""

    path: str
    source: str
    mapped: list = field(default_factory=list)
    fresh: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)

    def __str__(self):
        lines = [f"loaded {self.source} {self.path}: {len(self.mapped)} tensors mapped"]
        if self.fresh:
            lines.append(f"  freshly initialised: {', '.join(self.fresh)}")
        if self.ignored:
            lines.append(f"  ignored from checkpoint: {', '.join(self.ignored)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def read_source(path, ema=False):
    """Dispatch on what the path is: HF folder, .npz, or a torch/safetensors file (a run's .pt included).
    ema=True asks for a torch file's EMA weights; the other kinds have none."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path.")
    if ema and (os.path.isdir(path) or path.endswith((".npz", ".safetensors"))):
        raise UserError(f"checkpoint {path} holds no EMA weights (only torch files from a training run do); load it without asking for them.")
    if os.path.isdir(path):
        return read_hf_folder(path)
    is_file(path)  # a FIFO, device or socket is refused here, before any reader opens it
    if path.endswith(".npz"):
        return read_npz(path)
    if path.endswith(TORCH_SUFFIXES):
        return read_state_file(path, ema)
    raise UserError(
        f"checkpoint {path} has an unrecognised format; pass an HF model folder, a timm state dict "
        f"({', '.join(TORCH_SUFFIXES)}) or a Google .npz."
    )


def load_pretrained(cls, path, num_labels=None, image_size=None, ema=False, **overrides):
    """Build `cls` (ViTModel or ViTForImageClassification, whose from_pretrained calls this) from a
    checkpoint; see the module docstring. `cls.is_classifier` says whether it has a head. ema=True
    takes the EMA weights of a training file (timm's state_dict_ema, DeiT's and this project's model_ema)."""
    path = run_checkpoint(os.fspath(path))
    src = read_source(path, ema)
    state, known, source = src.state, src.config, src.kind
    unknown = set(overrides) - {f.name for f in fields(ViTConfig)}
    if unknown:
        raise UserError(f"unknown config override(s) {sorted(unknown)}; use ViTConfig field names such as num_attention_heads.")
    report = LoadReport(path, source, notes=list(src.notes), extras=src.extras)

    # the checkpoint's architecture: its config where it has one, else its shapes
    inferred = infer_config(state, path)
    kw = {**inferred, **known}
    if "num_attention_heads" not in kw and "num_attention_heads" not in overrides:
        raise UserError(
            f"checkpoint {path} has width {kw['hidden_size']}, which has no standard head count; "
            f"pass num_attention_heads=... to from_pretrained, or load it from an HF folder whose config.json states it."
        )
    if source == "HF-named state dict":
        report.notes.append("no config in the file: layer_norm_eps is HF's default 1e-12 unless overridden")
    old_grid = inferred["image_size"] // inferred["patch_size"]
    file_pos_prefix = 0 if inferred["no_embed_class"] else num_prefix(inferred)
    if "global_pool" not in known and "global_pool" not in overrides and inferred["class_token"]:
        why = ("timm pairs fc_norm with avg pooling, but fc_norm=True with token pooling saves the same keys" if inferred["fc_norm"]
               else "a timm model made with global_pool='avg', fc_norm=False saves a class-token model's keys")
        other = "avg" if kw["global_pool"] == "token" else "token"
        report.notes.append(f"pooling: global_pool={kw['global_pool']!r} assumed, as the file cannot tell ({why}); "
                            f"pass global_pool={other!r} (params.json: model.global_pool) if it was trained that way")
    kw.update(overrides)
    if image_size is not None:
        kw["image_size"] = image_size

    # the head: keep it when it fits, else a fresh zero one, said out loud
    is_classifier = cls.is_classifier
    head_rows = state["classifier.weight"].shape[0] if "classifier.weight" in state else None
    if kw.get("distilled") and head_rows is not None and "distillation_classifier.weight" not in state:
        # DeiT's heads come in pairs here: a class head alone (DeiTForImageClassification's) is not kept
        report.notes.append("the checkpoint's class head has no distillation head beside it, so both heads start fresh")
        head_rows = None
    if num_labels is not None:
        kw["num_labels"] = num_labels
        if num_labels != head_rows and "id2label" not in overrides:
            kw["id2label"] = None  # the checkpoint's class names belong to its own head
    elif head_rows is None and source != "Hugging Face folder":
        kw["num_labels"] = 0  # no head in the file and none asked for: features only
    keep_head = head_rows is not None and kw.get("num_labels") == head_rows
    # the first in21k release classifies from its pre_logits (our pooler); a new head sits on the CLS token
    kw["use_pre_logits"] = is_classifier and keep_head and "pooler.dense.weight" in state
    config = ViTConfig(**kw)
    switched = [f"{f.name}={getattr(config, f.name)!r}" for f in fields(config) if f.name in SWITCHES and getattr(config, f.name) != f.default]
    if switched:
        report.notes.append(f"ViT-family switches set: {', '.join(switched)} (see the README's loading section)")

    # adapt and resample what the new channel count, patch or image size needs
    kernel_key = "embeddings.patch_embeddings.projection.weight"
    if state[kernel_key].shape[1] != config.num_channels:
        report.notes.append(f"patch kernel adapted {state[kernel_key].shape[1]} -> {config.num_channels} input channels (timm's adapt_input_conv)")
        state[kernel_key] = adapt_input_channels(state[kernel_key], config.num_channels, path)
    if state[kernel_key].shape[-1] != config.patch_size:
        report.notes.append(f"patch kernel resampled {state[kernel_key].shape[-1]} -> {config.patch_size} (FlexiViT)")
        state[kernel_key] = resample_patch_kernel(state[kernel_key], config.patch_size)
    new_grid = config.image_size // config.patch_size
    if new_grid != old_grid:
        report.notes.append(f"position embeddings resampled {old_grid}x{old_grid} -> {new_grid}x{new_grid} (bicubic)")
        state["embeddings.position_embeddings"] = resample_pos_embed(state["embeddings.position_embeddings"], new_grid,
                                                                     num_prefix_tokens=file_pos_prefix)

    model = cls(config)
    if is_classifier:
        state = {(k if k.startswith(HEADS) else "vit." + k): v for k, v in state.items()}
        if not keep_head and config.num_labels > 0:
            was = f"the checkpoint's head has {head_rows} classes" if head_rows else "the checkpoint has no head"
            report.notes.append(f"new classifier for num_labels={config.num_labels} ({was}): zero-initialised, needs training")

    # the copy loop: only the pooler, the head and an fc_norm asked for by override (MAE's fine-tuning
    # recipe) may start fresh, and a head that does not fit does
    optional = HEADS + ("pooler.", "vit.pooler.", "fc_norm.", "vit.fc_norm.")
    skip = () if keep_head else HEADS
    report.mapped, report.fresh, report.ignored = copy_weights(model, state, path, optional, skip)
    if keep_head and is_zero_head(model):  # the first in21k release: google-research/vision_transformer#10
        report.notes.append(ZERO_HEAD)
    model.load_report = report
    if source != TRAINING_CHECKPOINT or report.fresh or report.ignored or report.notes:
        print(report)  # a run's own checkpoint, loaded as it was saved, has nothing to report
    return model


ZERO_HEAD = "this head is all zeros: the checkpoint is meant for fine-tuning"


def is_zero_head(model):
    """Whether a classifier's heads (the class head, and DeiT's distillation head) are Linear layers with
    every weight and bias zero: then all its logits are equal."""
    heads = [h for h in (getattr(model, "classifier", None), getattr(model, "distillation_classifier", None)) if h is not None]
    return bool(heads) and all(isinstance(h, torch.nn.Linear) and not h.weight.any() and (h.bias is None or not h.bias.any())
                               for h in heads)


def copy_weights(model, state, path, optional=(), skip=()):
    """The copy loop: every tensor the model wants, shape-checked, from `state` into `model`.

    Keys under `optional` may be absent and keys under `skip` are not copied: both start fresh.
    Returns the keys mapped, the keys left fresh, and the checkpoint's keys left unused.
    """
    target = model.state_dict()
    missing = [k for k in target if k not in state and not k.startswith(optional)]
    if missing:
        raise UserError(
            f"checkpoint {path} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}; "
            f"check its config (num_hidden_layers, ...) and any overrides against the weights."
        )
    mapped, fresh = [], []
    with torch.no_grad():
        for key, dst in target.items():
            if key not in state or key.startswith(skip):
                fresh.append(key)
                continue
            src = state[key]
            if src.shape != dst.shape:
                raise UserError(
                    f"checkpoint {path}: tensor {key!r} has shape {tuple(src.shape)} but the model expects "
                    f"{tuple(dst.shape)}; check its config (hidden_size, num_channels, ...) and any overrides against the weights."
                )
            dst.copy_(src)
            mapped.append(key)
    ignored = sorted(k for k in state if k not in target or k.startswith(skip))
    return mapped, fresh, ignored


def inference_info(model):
    """What the commands need beyond a loaded model's weights: class names, mean/std, the training
    run's params (None for a pretrained source), image size and channels.

    mean/std come from the file (a training checkpoint, an HF folder's preprocessor_config.json), else
    0.5/0.5: the Google checkpoints' scaling to [-1, 1] (timm's ImageNet-1k DeiT-style files use other
    values), said out loud.
    """
    config, report = model.config, model.load_report
    extras, channels = report.extras, config.num_channels
    id2label = config.id2label or {}
    if "mean" in extras and "std" in extras:
        mean, std = ([v[0]] * channels if len(v) == 1 else list(v)[:channels] for v in (extras["mean"], extras["std"]))
        if len(mean) < channels or len(std) < channels:
            raise UserError(f"{report.path} states mean {extras['mean']} and std {extras['std']} for fewer than its "
                            f"{channels} input channels; fix its normalization.")
    else:
        print(f"{report.path} states no normalization: assuming mean 0.5 and std 0.5 per channel (the Google checkpoints')")
        mean, std = [0.5] * channels, [0.5] * channels
    return {"classes": [id2label[i] for i in sorted(id2label)] if id2label else None, "mean": mean, "std": std,
            "params": extras.get("params"), "image_size": config.image_size, "channels": channels}
