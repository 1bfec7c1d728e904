"""Optimizer and learning-rate schedule: AdamW with decay on matrices only, layer-wise lr decay,
warm-up + cosine per iteration, the batch-size scaling rule, and freezing for a linear probe.

References: nanoGPT's configure_optimizers and get_lr; BEiT/MAE's param_groups_lrd.
"""

import math
from typing import Sequence

import torch

# tensors that are >= 2-D but still must not be decayed (they are embeddings, not weights)
NO_DECAY_NAMES = ("cls_token", "position_embeddings", "distillation_token", "register_tokens")


def scaled_lr(train: dict, world_size: int) -> float:
    """train.lr, scaled linearly by effective batch / lr_scale_batch when that is set (Goyal et al.)."""
    if train["lr_scale_batch"] is None:
        return train["lr"]
    batch = train["batch_size"] * train["grad_accum"] * world_size
    return train["lr"] * batch / train["lr_scale_batch"]


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, totals: Sequence[tuple[int, int]]) -> float:
    """Learning rate at optimizer step `step`: linear warm-up (base_lr / warmup_steps at step 0), then
    cosine down to min_lr over the length `totals` gives (see `decay_progress`)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = decay_progress(step, warmup_steps, totals)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def decay_progress(step: int, warmup_steps: int, totals: Sequence[tuple[int, int]]) -> float:
    """How far the cosine after the warm-up has come at `step`, from 0 to 1.

    `totals` is the schedule's length as [(from_step, total_steps), ...]: the first pair is the length
    the run started with, and a time budget adds one whenever it changes the run's length
    (vit/train/budget.py). From each from_step on, the rest of the decay is spread evenly over the
    steps left until that total, so the learning rate never jumps. With one pair this is the plain
    (step - warmup) / (total - warmup)."""
    done, start, total = 0.0, warmup_steps, totals[0][1]
    for at, new_total in totals[1:]:
        if step < at:
            break
        at = max(at, warmup_steps)
        done, start, total = _advance(done, start, total, at), at, new_total
    return min(1.0, _advance(done, start, total, max(step, start)))


def _advance(done: float, start: int, total: int, step: int) -> float:
    """Decay progress at `step`, when it was `done` at `start` and reaches 1 at step `total`."""
    if step >= total:
        return 1.0
    return done + (1.0 - done) * (step - start) / (total - start)


def layer_id(name, num_layers):
    """0 for the embeddings, i+1 for encoder layer i, num_layers+1 for the final norm, pooler and head."""
    if name.startswith(("vit.embeddings.", "vit.norm_pre.")):  # CLIP's pre-norm belongs to the stem, as in timm
        return 0
    if name.startswith("vit.encoder.layer."):
        return int(name.split(".")[3]) + 1
    return num_layers + 1


def freeze_backbone(model: torch.nn.Module) -> None:
    """Linear probe: only the classifier (and a distilled model's second head) keeps requires_grad."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(("classifier.", "distillation_classifier."))


def param_groups(model, weight_decay, layer_decay=None):
    """AdamW groups keyed by (decay?, layer): decay only matrices, lr_scale = layer_decay ** depth-from-top."""
    num_layers = model.config.num_hidden_layers
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)
        lid = layer_id(name, num_layers) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers + 1 - lid) if layer_decay is not None else 1.0
        key = (decay, lid)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, train: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused on CUDA (one kernel for all parameters)."""
    groups = param_groups(model, train["weight_decay"], train["layer_decay"])
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=train["lr"], betas=(0.9, 0.999), **extra)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply the schedule's lr to every group, times its layer-decay scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
