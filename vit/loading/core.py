"""The shared core of the loader: every reader (hf.py, timm.py, npz.py, project.py) turns its file into
a `Source` through these, and load.py builds the model from it.

- the one safe reader of torch files (`read_file`: safetensors, or torch.load(weights_only=True)) and
  the unwrapping of the state dict it holds;
- `rename`: a source's declarative rename table, with explicit transpose rules, into our keys (the HF
  names without `vit.`); a tensor that no rule names is refused, never dropped;
- the architecture from tensor shapes (`infer_config`), and a stated config checked against them;
- the copy loop, nanoGPT-style, that shape-checks every tensor, and the `LoadReport` of what it did.
"""

import argparse
import math
import os
import re
from dataclasses import dataclass, field, fields

from typing import Optional

import torch

from vit.config import ViTConfig
from vit.errors import UserError, special_file_kind

# -----------------------------------------------------------------------------
# the one safe reader of torch files

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's, on a wrapped model's keys
# where a file keeps an exponential moving average of its weights: DeiT's and this project's, timm's train.py's
EMA_KEYS = ("model_ema", "state_dict_ema")
# the one class a weights_only load may rebuild besides tensors and plain types: timm's train.py saves
# its argparse arguments as `args` (timm reads its own files the same way); anything else is refused
SAFE_GLOBALS = [argparse.Namespace]


def is_file(path: str) -> bool:
    """os.path.isfile, except that a FIFO, device or socket is refused by name before anything opens it."""
    kind = special_file_kind(path)
    if kind is not None:
        raise UserError(f"checkpoint {path} is {kind}, not a regular file; pass a checkpoint file or folder.")
    return os.path.isfile(path)


def read_file(path: str, mmap: bool = False):
    """What a .safetensors, .pth, .pt, .bin, .ckpt or .pth.tar file holds, read without running code
    from it: safetensors, or torch.load(weights_only=True) with only SAFE_GLOBALS allowed. The
    project's only reader of torch files. With mmap=True a torch file's tensors are mapped, not read:
    what a checkpoint says beside its weights costs no more than that (`vit runs`)."""
    if not is_file(path):
        raise UserError(f"checkpoint {path} does not exist; check the path.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        with torch.serialization.safe_globals(SAFE_GLOBALS):  # for this load only, not process-wide
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    # a corrupt, truncated or hostile file can fail anywhere in the zip / pickle / header layers
    except Exception as e:  # noqa: BLE001
        unsafe = "Weights only load failed" in str(e)
        reason = "it holds pickled objects that could run code" if unsafe else "it is corrupt, truncated or not a checkpoint"
        raise UserError(f"cannot read checkpoint {path}: {reason} ({type(e).__name__}); use a state-dict file saved with torch.save or safetensors.") from None


def tensors_of(obj, path: str, ema: bool = False) -> dict:
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


def ema_notes(obj, ema: bool) -> list:
    """The load report's word on EMA weights: taken as asked, or there to be asked for."""
    if ema:
        return ["the EMA weights, as asked"]
    key = next((k for k in EMA_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
    return [f"the file also holds EMA weights ({key}): from_pretrained(..., ema=True) or --ema loads those"] if key else []


def strip_prefixes(state: dict, prefixes: tuple[str, ...]) -> dict:
    """Drop wrapper prefixes (DDP's `module.`, torch.compile's `_orig_mod.`, HF's `vit.`) wherever they lead."""
    out = {}
    for k, v in state.items():
        while k.startswith(prefixes):
            k = k[len(next(p for p in prefixes if k.startswith(p))):]
        out[k] = v
    return out


# -----------------------------------------------------------------------------
# rename tables: (source regex, our key, transpose rule); each source's table is beside its reader

L = "encoder.layer.\\1."  # our prefix for block \1 of the source's key, for the tables' targets

# tensors of ViT variants this model has no layout for, refused by name rather than dropped
UNSUPPORTED = [
    (r"attn_pool\..*|MAPHead_0/.*", "an attention-pooling head (SigLIP's global_pool='map')"),
    (r".*\.(q_norm|k_norm)\..*", "qk-norm"),
    (r".*\.mlp\.(fc1_g|fc1_x|w12|w3|weights_in|weights_out)\..*", "a SwiGLU MLP"),
    (r".*\.(attn|mlp)\.norm\..*", "a norm inside attention or the MLP (timm's scale_attn_norm / scale_mlp_norm)"),
    (r"patch_embed\.norm\..*", "a norm after the patch embedding"),
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


def rename(state: dict, table: list, path: str) -> dict:
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
# what every reader returns, and what more than one reader needs


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


def fold_class_position(state: dict) -> dict:
    """DINOv2 with registers gives the class token a position but not the registers: add that
    position to the class token once, leaving positions for the patches only (no_embed_class), as
    timm's conversion does. Exact: the class token and its position are both constants."""
    if "embeddings.position_embeddings" not in state or "embeddings.cls_token" not in state:
        return state  # incomplete: infer_config names what is missing
    pos = state["embeddings.position_embeddings"]  # (1, 1+N, D)
    state["embeddings.cls_token"] = state["embeddings.cls_token"] + pos[:, :1]
    state["embeddings.position_embeddings"] = pos[:, 1:]
    return state


def checked_normalization(mean, std, where: str) -> dict:
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


def config_fields(config: ViTConfig, state: dict, path: str, where: str) -> dict:
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


# -----------------------------------------------------------------------------
# architecture from shapes

# standard head count per width (the paper's Table 1 and DeiT); anything else needs an override
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

def infer_config(state: dict, path: str) -> dict:
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


def num_prefix(switches: dict) -> int:
    return int(switches["class_token"]) + int(switches["distilled"]) + switches["num_register_tokens"]


def infer_switches(state: dict, path: str) -> dict:
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
# the copy loop and its report


@dataclass
class LoadReport:
    """What a load did, kept on the model as `model.load_report` and logged once (the `vit` logger);
    `extras` is what the file carried beyond the weights (see Source), for vit/factory.py's `inference_info`."""

    path: str
    source: str
    mapped: list = field(default_factory=list)
    fresh: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    adapted_channels: Optional[tuple] = None  # (the file's input channels, the model's) when the patch kernel was adapted
    said: tuple = ()  # key prefixes a note speaks for (a new head's): left out of the printed fresh and ignored lines

    def __str__(self):
        lines = [f"loaded {self.source} {self.path}: {len(self.mapped)} tensors mapped"]
        fresh, ignored = ([k for k in keys if not k.startswith(self.said)] for keys in (self.fresh, self.ignored))
        if fresh:
            lines.append(f"  freshly initialised: {', '.join(fresh)}")
        if ignored:
            lines.append(f"  ignored from checkpoint: {', '.join(ignored)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


ZERO_HEAD = "this head is all zeros: the checkpoint is meant for fine-tuning"


def is_zero_head(model: torch.nn.Module) -> bool:
    """Whether a classifier's heads (the class head, and DeiT's distillation head) are Linear layers with
    every weight and bias zero: then all its logits are equal."""
    heads = [h for h in (getattr(model, "classifier", None), getattr(model, "distillation_classifier", None)) if h is not None]
    return bool(heads) and all(isinstance(h, torch.nn.Linear) and not h.weight.any() and (h.bias is None or not h.bias.any())
                               for h in heads)


def copy_weights(model: torch.nn.Module, state: dict, path: str, optional: tuple = (),
                 skip: tuple = ()) -> tuple[list, list, list]:
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

