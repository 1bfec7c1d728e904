"""What the two models share that is not one of their modules: loading and saving (`from_pretrained`,
`save_pretrained`), the init of their standard layers, the parameter count, and the switch for
gradient checkpointing.

Plumbing kept out of vit/model.py, as transformers keeps it in modeling_utils.PreTrainedModel: the model
file holds the modules, this one how they start and how they reach and leave the disk.
"""

import json
import math
import os
from functools import partial
from typing import Optional, TypeVar, Union

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vit.loading.load import load_pretrained
from vit.resize import adapt_input_channels

Model = TypeVar("Model", bound="PreTrainedModel")
KERNEL = "embeddings.patch_embeddings.projection.weight"  # the patch kernel, (D, C, p, p), under `vit.` in a classifier


class PreTrainedModel(nn.Module):
    """The base of ViTModel and ViTForImageClassification; `self.config` is their ViTConfig."""

    is_classifier = False  # the loader keys a classifier's backbone under `vit.` and fits its head

    @classmethod
    def from_pretrained(cls: type[Model], path: Union[str, os.PathLike], *, num_labels: Optional[int] = None,
                        image_size: Optional[int] = None, ema: bool = False, **overrides) -> Model:
        """Load an HF folder, a timm state-dict file, a Google .npz, or this project's best.pt / last.pt or
        run folder; see vit/loading/. `num_labels` other than the file's gives a fresh zero head,
        `image_size` resamples the position embeddings, `ema` takes a training file's EMA weights, and
        `overrides` are ViTConfig fields (num_attention_heads=..., num_channels=1, global_pool="avg", ...).
        What the load did is `model.load_report`, and is logged on the `vit` logger."""
        return load_pretrained(cls, path, num_labels=num_labels, image_size=image_size, ema=ema, **overrides)

    def save_pretrained(self, directory: Union[str, os.PathLike], num_channels: Optional[int] = None,
                        state_dict: Optional[dict] = None) -> None:
        """Write config.json and model.safetensors, a folder transformers' from_pretrained reads. Both are
        written by open(), so they follow the user's umask (safetensors' own save_file writes 0600).
        `num_channels` saves the model for another input channel count, its patch kernel adapted as the
        loader adapts it (vit/resize.py): 3 makes a gray model one that takes RGB, as transformers'
        image pipelines feed it. `state_dict` (HF's argument) is saved instead of the model's own, e.g.
        an FSDP model's gathered weights."""
        from safetensors.torch import save

        os.makedirs(directory, exist_ok=True)
        config = self.config.to_hf_dict()
        config["architectures"] = [type(self).__name__]
        tensors = {k: v.detach().contiguous().cpu() for k, v in (self.state_dict() if state_dict is None else state_dict).items()}
        if num_channels is not None and num_channels != self.config.num_channels:
            kernel = next(k for k in tensors if k.endswith(KERNEL))
            tensors[kernel] = adapt_input_channels(tensors[kernel], num_channels, str(directory))
            config["num_channels"] = num_channels
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(save(tensors, metadata={"format": "pt"}))

    def _init_weights(self, module: nn.Module) -> None:
        # HF's init: truncated normal for matrices (and, in ViTModel, the learned embeddings), zero biases.
        # weight_init="jax" is the original Flax code's (timm's init_weights_vit_jax): Xavier-uniform
        # matrices, one per query/key/value as Flax keeps them, and LeCun-normal patch kernels. At small
        # widths its larger weights learn much faster from scratch (Fashion-MNIST, width 96, depth 4, a
        # 3-epoch schedule: test accuracy 76.5% -> 79.4% after one epoch, 84.3% -> 85.7% after three);
        # pretrained weights overwrite either.
        std = self.config.initializer_range
        jax = self.config.weight_init == "jax"
        if isinstance(module, nn.Linear) and jax:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d) and jax:
            s = math.sqrt(1 / module.weight[0].numel()) / .87962566103423978  # lecun_normal: fan_in = C * p * p
            nn.init.trunc_normal_(module.weight, std=s, a=-2 * s, b=2 * s)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (HF's name;
        timm's set_grad_checkpointing): less memory for about one more forward pass per step. The
        kwargs go to torch.utils.checkpoint.checkpoint (non-reentrant by default)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):  # the encoder, which runs the blocks
                module.gradient_checkpointing = True
                module._gradient_checkpointing_func = partial(checkpoint, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())
