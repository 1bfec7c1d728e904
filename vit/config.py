"""The model's configuration: ViTConfig with Hugging Face's field names, and the paper's presets.

Plain Python, no torch: `vit.params` validates presets and the loader reads config.json
through it without building a model. The modules themselves are in `vit/model.py`.
"""

import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Optional

from vit.errors import UserError

# the paper's Table 1 (plus DeiT's Ti and S): width, depth, heads, MLP width
PRESETS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}
PRESET_RE = re.compile(rf"(?:ViT-)?({'|'.join(PRESETS)})/([1-9]\d*)")  # "B/16", "ViT-S/32": size, patch
# the hidden_act values; vit/model.py maps each to its nn.Module (ACT2FN)
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "quick_gelu")
WEIGHT_INITS = ("trunc_normal", "jax")  # how a model trained from scratch starts; see vit/pretrained.py, PreTrainedModel._init_weights
# what the head reads (timm's global_pool): the class token, or the mean of the patch tokens
POOLINGS = ("token", "avg")
# ViTConfig's fields for the ViT family (DeiT, DINOv2, CLIP, MAE, gap models); all off is the classic ViT
SWITCHES = ("class_token", "global_pool", "fc_norm", "layer_scale_init", "num_register_tokens", "pre_norm", "distilled", "no_embed_class")
# (field, lower-bound test, exclusive upper bound, the range in words) of every float field
FLOAT_FIELDS = (
    ("hidden_dropout_prob", lambda v: v >= 0, 1, "at least 0 and below 1"),
    ("attention_probs_dropout_prob", lambda v: v >= 0, 1, "at least 0 and below 1"),
    ("drop_path_rate", lambda v: v >= 0, 1, "at least 0 and below 1"),
    ("initializer_range", lambda v: v > 0, math.inf, "above 0"),
    ("layer_norm_eps", lambda v: v > 0, 1, "above 0 and below 1"),
)


@dataclass
class ViTConfig:
    """Hyper-parameters, with Hugging Face's field names so config.json round-trips."""

    hidden_size: int = 768  # width D of every token
    num_hidden_layers: int = 12  # depth
    num_attention_heads: int = 12  # heads; head_dim = hidden_size // heads
    intermediate_size: int = 3072  # MLP width, 4x hidden_size in the paper
    hidden_act: str = "gelu"  # exact (erf) GELU, as in the paper and all released checkpoints
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02  # std of the truncated normal init
    layer_norm_eps: float = 1e-12  # HF's default; timm and Google checkpoints use 1e-6
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_labels: int = 1000
    # not in HF's ViTConfig: training-only or checkpoint-only extras
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth (timm's rule)
    weight_init: str = "trunc_normal"  # "trunc_normal" (HF's and timm's default) or "jax" (the original Flax code's)
    use_pre_logits: bool = False  # first in21k release: classify from the pooler (dense + tanh)
    id2label: Optional[dict] = field(default=None, repr=False)  # {int: class name}
    # the ViT family's switches, timm's names (HF's ViT has none of them): each default is the classic ViT
    class_token: bool = True  # a learned class token before the patches; off in timm's *_gap_* models
    global_pool: str = "token"  # what the head reads: "token" (the class token) or "avg" (mean of the patch tokens)
    fc_norm: bool = False  # the final LayerNorm after pooling instead of before (MAE fine-tuning, some gap models)
    layer_scale_init: Optional[float] = None  # learned per-channel scale on each residual branch, this at init (DeiT III, DINOv2)
    num_register_tokens: int = 0  # extra learned tokens after the class token, dropped by the head (DINOv2 with registers)
    pre_norm: bool = False  # a LayerNorm on the embeddings before the first block, and no patch bias (CLIP)
    distilled: bool = False  # DeiT's distillation token and second head; the two heads' logits are averaged
    no_embed_class: bool = False  # position embeddings for the patches only, added before the prefix tokens join (DeiT III)

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"{name}={value!r} must be a positive integer; fix it in the config or the overrides.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise UserError(
                f"num_attention_heads={self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}; choose a head count that divides the width."
            )
        if self.image_size % self.patch_size != 0:
            raise UserError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}; "
                f"use a multiple of {self.patch_size} such as {self.patch_size * max(1, round(self.image_size / self.patch_size))}."
            )
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACTIVATIONS:
            raise UserError(f"hidden_act={self.hidden_act!r} is not known; choose one of {sorted(ACTIVATIONS)}.")
        if self.weight_init not in WEIGHT_INITS:
            raise UserError(f"weight_init={self.weight_init!r} is not known; choose one of {list(WEIGHT_INITS)}.")
        # a foreign config.json can hold anything: check what the model will compute with before it is built
        for name, low, high, words in FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or not (low(value) and value < high):
                raise UserError(f"{name}={value!r} must be a number {words}; fix it in the config or the overrides.")
        for name in ("qkv_bias", "use_pre_logits"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name}={getattr(self, name)!r} must be true or false; fix it in the config or the overrides.")
        if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 0:
            raise UserError(f"num_labels={self.num_labels!r} must be an integer, 0 or more; fix it in the config or the overrides.")
        if self.id2label is not None:
            self.id2label = _class_names(self.id2label)
            self.num_labels = len(self.id2label)  # the class names decide the head's size
        self._check_switches()

    def _check_switches(self):
        """The ViT-family switches: each of the right type, and no combination the model cannot build."""
        for name in ("class_token", "fc_norm", "pre_norm", "distilled", "no_embed_class"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name}={getattr(self, name)!r} must be true or false; fix it in the config or the overrides.")
        if self.global_pool not in POOLINGS:
            raise UserError(f"global_pool={self.global_pool!r} is not known; choose one of {list(POOLINGS)}.")
        if not isinstance(self.num_register_tokens, int) or isinstance(self.num_register_tokens, bool) or self.num_register_tokens < 0:
            raise UserError(f"num_register_tokens={self.num_register_tokens!r} must be 0 or a positive integer.")
        scale = self.layer_scale_init
        if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale)):
            raise UserError(f"layer_scale_init={scale!r} must be a number (e.g. 1e-5) or null for no layer scale.")
        if self.global_pool == "token" and not self.class_token:
            raise UserError("global_pool='token' needs class_token=True; use global_pool='avg' for a model without a class token.")
        if self.distilled and (not self.class_token or self.global_pool != "token"):
            raise UserError("distilled=True needs class_token=True and global_pool='token': DeiT's heads read the class and distillation tokens.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """The tokens before the patches (timm's name): class, distillation and register tokens, in that order."""
        return int(self.class_token) + int(self.distilled) + self.num_register_tokens

    @property
    def num_pos_prefix_tokens(self) -> int:
        """The prefix tokens that have a position embedding: all of them, or none with no_embed_class."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ViTConfig":
        """'B/16', 'ViT-L/14', ... : the paper's sizes (Table 1) at any patch and image size."""
        m = PRESET_RE.fullmatch(name.strip())
        if m is None:
            raise UserError(
                f"model preset {name!r} is not known; use a size from {list(PRESETS)} and a patch "
                f"size, e.g. 'B/16' or 'ViT-S/32'."
            )
        size, patch = m.group(1), int(m.group(2))
        width, depth, heads, mlp = PRESETS[size]
        kw = dict(
            hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
            intermediate_size=mlp, patch_size=patch, layer_norm_eps=1e-6,
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """A config.json body that transformers reads as its own ViTConfig."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "id2label"}
        names = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        d["id2label"] = {str(i): n for i, n in names.items()}
        d["label2id"] = {n: i for i, n in names.items()}
        d.pop("num_labels")  # HF derives it from id2label
        d["model_type"] = "vit"
        d["encoder_stride"] = self.patch_size
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ViTConfig":
        """Read an HF config.json body, ignoring the keys this model has no use for."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # num_labels follows id2label in __post_init__


# -----------------------------------------------------------------------------
# what a config costs, from its sizes alone: checked before anything is allocated

FALLBACK_MEMORY = 2**42  # 4 TiB: the bound where the OS does not say how much memory it has


def parameter_count(config: ViTConfig) -> int:
    """The parameters of a ViTForImageClassification with `config` (ViTModel: num_labels=0), without building it."""
    c, d, i = config, config.hidden_size, config.intermediate_size
    block = 4 * d + 3 * (d * d + d * c.qkv_bias) + d * d + d + 2 * d * i + i + d + (2 * d if c.layer_scale_init is not None else 0)
    embeddings = (c.num_channels * c.patch_size**2 * d + (0 if c.pre_norm else d) + c.num_prefix_tokens * d
                  + (c.num_patches + c.num_pos_prefix_tokens) * d + (2 * d if c.pre_norm else 0))
    heads = (d * c.num_labels + c.num_labels) * (2 if c.distilled else 1) if c.num_labels > 0 else 0
    return embeddings + c.num_hidden_layers * block + 2 * d + (d * d + d if c.use_pre_logits else 0) + heads


def machine_memory() -> int:
    """Bytes of physical memory on this machine (FALLBACK_MEMORY where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return FALLBACK_MEMORY


def check_memory(config: ViTConfig, what: str, advice: str, batch_size: int = 0, kept_layers: Optional[int] = None) -> None:
    """Refuse, in one sentence starting with `what` and ending with `advice`, a model that cannot fit in this
    machine's memory: its fp32 weights, and with batch_size > 0 the activations a training step keeps for
    the backward pass in `kept_layers` blocks (default all; 1 with gradient checkpointing or a frozen
    backbone). A lower bound (4D + MLP width values a token per block, at 2 bytes: bf16, the least any
    precision keeps), so what it refuses cannot run, on a CPU or a GPU."""
    tokens = config.num_patches + config.num_prefix_tokens
    layers = config.num_hidden_layers if kept_layers is None else kept_layers
    count = parameter_count(config)
    need = 4 * count + 2 * batch_size * layers * tokens * (4 * config.hidden_size + config.intermediate_size)
    have = machine_memory()
    if need > have:
        doing = f"to train on {batch_size} images at a time" if batch_size else "to hold its weights"
        raise UserError(f"{what} has {count:,} parameters and {tokens:,} tokens per image, and needs at least "
                        f"{_bytes(need)} {doing}, more than this machine's {_bytes(have)} of memory; {advice}.")


def _bytes(n):
    """1.5 GB, 212 TB: a size in words."""
    units = ["bytes", "KB", "MB", "GB", "TB", "PB"]
    k = min(int(math.log(max(n, 1), 1000)), len(units) - 1)
    return f"{n / 1000**k:.3g} {units[k]}" if k else f"{n} bytes"


def _is_number(value):
    """An int or float, and not a bool (True is an int in Python, but not a probability)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _class_names(id2label):
    """{0: name, 1: name, ...} from a config's id2label (JSON keys are strings), refused unless it numbers 0..K-1."""
    if not isinstance(id2label, dict):
        raise UserError(f"id2label must map class indices to names, got {type(id2label).__name__}; fix it in the config.")
    try:
        names = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        names = {}
    if sorted(names) != list(range(len(id2label))):
        raise UserError(f"id2label keys {sorted(id2label, key=str)[:5]} are not the class indices 0..{len(id2label) - 1}; fix it in the config.")
    return names
