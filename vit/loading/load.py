"""Load weights into our ViT: `load_pretrained`, which the models' `from_pretrained` calls.

A path is read by the reader of its kind (hf.py, timm.py, npz.py, project.py), each of which turns its
source into one flat dict of torch tensors under *our* key names (the HF names, without the `vit.`
prefix) by its own rename table and explicit transpose rules. Then the architecture comes from the
file's config or its shapes, a new image, patch or channel count is fitted with `vit/resize.py`, and
one copy loop (core.py) checks every shape and reports what was mapped, initialised fresh or ignored.

The model classes call in through `from_pretrained(path)`, passing themselves: this file builds them,
and imports no model. The report goes to the `vit` logger, which the command line prints.
"""

import logging
import os
from dataclasses import fields
from typing import Optional, TypeVar, Union

from vit.config import SWITCHES, ViTConfig, check_memory
from vit.errors import UserError
from vit.loading import hf, npz, project, timm
from vit.loading.core import (WRAPPER_PREFIXES, ZERO_HEAD, LoadReport, Source, copy_weights, ema_notes, infer_config, is_file,
                              is_zero_head, num_prefix, read_file, strip_prefixes, tensors_of)
from vit.resize import adapt_input_channels, resample_patch_kernel, resample_pos_embed

logger = logging.getLogger(__name__)
M = TypeVar("M")  # the model class from_pretrained was called on

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".pth.tar")  # .pth.tar: timm's train.py
HEADS = ("classifier.", "distillation_classifier.")  # a classifier's heads, outside its `vit.` backbone


def read_source(path: str, ema: bool = False) -> Source:
    """Dispatch on what the path is: HF folder, .npz, or a torch/safetensors file (a run's .pt included).
    ema=True asks for a torch file's EMA weights; the other kinds have none."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path.")
    if ema and (os.path.isdir(path) or path.endswith((".npz", ".safetensors"))):
        raise UserError(f"checkpoint {path} holds no EMA weights (only torch files from a training run do); load it without asking for them.")
    if os.path.isdir(path):
        return hf.read_hf_folder(path)
    is_file(path)  # a FIFO, device or socket is refused here, before any reader opens it
    if path.endswith(".npz"):
        return npz.read_npz(path)
    if path.endswith(TORCH_SUFFIXES):
        return read_torch_file(path, ema)
    raise UserError(
        f"checkpoint {path} has an unrecognised format; pass an HF model folder, a timm state dict "
        f"({', '.join(TORCH_SUFFIXES)}) or a Google .npz."
    )


def read_torch_file(path: str, ema: bool = False) -> Source:
    """A timm (or HF-named) state-dict file, or this project's training checkpoint with its config,
    normalization and params; the keys tell which. ema=True takes the file's EMA weights."""
    obj = read_file(path)
    state = strip_prefixes(tensors_of(obj, path, ema), WRAPPER_PREFIXES)
    notes = ema_notes(obj, ema)
    if timm.KEY in state:
        return timm.from_timm_state(state, path, notes)
    state = strip_prefixes(state, ("vit.",))
    if "embeddings.patch_embeddings.projection.weight" in state:
        return project.from_training_checkpoint(obj, state, path, notes) if project.is_ours(obj) else hf.from_hf_state(state, notes)
    raise UserError(
        f"checkpoint {path} is not a recognised ViT state dict (no patch_embed.proj.weight or "
        f"embeddings.patch_embeddings.projection.weight); pass a timm or Hugging Face ViT checkpoint."
    )


def load_pretrained(cls: type[M], path: Union[str, os.PathLike], num_labels: Optional[int] = None,
                    image_size: Optional[int] = None, ema: bool = False, **overrides) -> M:
    """Build `cls` (ViTModel or ViTForImageClassification, whose from_pretrained calls this) from a
    checkpoint; see the module docstring. `cls.is_classifier` says whether it has a head. ema=True
    takes the EMA weights of a training file (timm's state_dict_ema, DeiT's and this project's model_ema).
    The load report goes to the `vit` logger: a warning when it has something to say, else info."""
    path = project.run_checkpoint(os.fspath(path))
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
    elif head_rows is None and source != hf.FOLDER:
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
        report.adapted_channels = old_new = (state[kernel_key].shape[1], config.num_channels)
        how = "timm's adapt_input_conv" if old_new[1] == 1 else "PIL's luma weights" if old_new == (1, 3) else "the channels' mean"
        report.notes.append(f"patch kernel adapted {old_new[0]} -> {old_new[1]} input channels ({how})")
        state[kernel_key] = adapt_input_channels(state[kernel_key], config.num_channels, path)
    if state[kernel_key].shape[-1] != config.patch_size:
        report.notes.append(f"patch kernel resampled {state[kernel_key].shape[-1]} -> {config.patch_size} (FlexiViT)")
        state[kernel_key] = resample_patch_kernel(state[kernel_key], config.patch_size)
    new_grid = config.image_size // config.patch_size
    if new_grid != old_grid:
        report.notes.append(f"position embeddings resampled {old_grid}x{old_grid} -> {new_grid}x{new_grid} (bicubic)")
        state["embeddings.position_embeddings"] = resample_pos_embed(state["embeddings.position_embeddings"], new_grid,
                                                                     num_prefix_tokens=file_pos_prefix)

    check_memory(config, f"checkpoint {path} at image_size {config.image_size}", "load it at a smaller image size")
    model = cls(config)
    new_head = is_classifier and not keep_head and config.num_labels > 0
    if is_classifier:
        state = {(k if k.startswith(HEADS) else "vit." + k): v for k, v in state.items()}
        if new_head:
            was = f"the checkpoint's head for {head_rows} classes is left out" if head_rows else "the checkpoint has no head"
            report.notes.append(f"new classifier for num_labels={config.num_labels} ({was}): zero-initialised, needs training")

    # the copy loop: only the pooler, the head and an fc_norm asked for by override (MAE's fine-tuning
    # recipe) may start fresh, and a head that does not fit does
    optional = HEADS + ("pooler.", "vit.pooler.", "fc_norm.", "vit.fc_norm.")
    skip = () if keep_head else HEADS
    report.mapped, report.fresh, report.ignored = copy_weights(model, state, path, optional, skip)
    if new_head:  # the note above says it once: the printed report does not list the heads' keys again
        report.said = HEADS
    if keep_head and is_zero_head(model):  # the first in21k release: google-research/vision_transformer#10
        report.notes.append(ZERO_HEAD)
    model.load_report = report
    if report.fresh or report.ignored or report.notes:
        logger.warning("%s", report)
    elif source != project.KIND:  # a run's own checkpoint, loaded as it was saved, has nothing to report
        logger.info("%s", report)
    return model

