"""Where a model comes from, for training and for inference alike, and nothing of training itself:

- `build_model`: the classifier params.json describes (a preset and/or explicit sizes, or a pretrained
  source with a new head), for the training run (vit/train/) and the benchmarks;
- `load_model`: an eval-mode classifier from any checkpoint, with `inference_info`, what the commands
  (eval, predict, attention, inspect, features) need beyond its weights.

timm's create_model in miniature: it sits below the training code and the commands, and imports neither.
"""

import logging
from typing import Sequence

import torch

from vit import params as P
from vit.errors import UserError
from vit.model import ViTForImageClassification

logger = logging.getLogger(__name__)


def build_model(params: dict, classes: Sequence[str]) -> ViTForImageClassification:
    """The model params.json describes (`params` whole and validated, vit/params.py), with a head for `classes`."""
    m, d, t = params["model"], params["data"], params["train"]
    id2label = dict(enumerate(classes))
    common = dict(image_size=d["image_size"], drop_path_rate=t["drop_path"], hidden_dropout_prob=m["hidden_dropout_prob"],
                  attention_probs_dropout_prob=m["attention_probs_dropout_prob"])
    if m["global_pool"] is not None:
        common["global_pool"] = m["global_pool"]
    if m["pretrained"] is None:  # its size was checked at validation, before anything was allocated
        return ViTForImageClassification(P.architecture(params, num_labels=len(classes), id2label=id2label, **common))
    model = ViTForImageClassification.from_pretrained(
        m["pretrained"], num_labels=len(classes), id2label=id2label, num_channels=d["channels"],
        ema=m["pretrained_ema"], **common)
    P.check_fits(model.config, params, f"model.pretrained {m['pretrained']} at data.image_size {d['image_size']}")
    if model.load_report.adapted_channels is not None:
        logger.warning("%s", channel_change(model.load_report, params))
    return model


def channel_change(report, params: dict) -> str:
    """The start-up line of a fine-tune from RGB to gray data (or the reverse): what was adapted, and the
    normalization and learning rate in force, beside what the checkpoint states."""
    was, now = report.adapted_channels
    d, t = params["data"], params["train"]
    stated = f" (the checkpoint states mean {report.extras['mean']}, std {report.extras['std']})" if "mean" in report.extras else ""
    scaled = f" x effective batch / train.lr_scale_batch {t['lr_scale_batch']}" if t["lr_scale_batch"] is not None else ""
    return (f"note: model.pretrained {report.path} was trained on {_channels(was)} images and data.channels is {now}: "
            f"it sees {_channels(now)} images through its adapted patch kernel; in force: data.mean {d['mean']}, "
            f"data.std {d['std']}{stated}, train.lr {t['lr']:g}{scaled}")


def _channels(n: int) -> str:
    return {1: "1-channel (grayscale)", 3: "3-channel (RGB)"}.get(n, f"{n}-channel")


def load_model(path: str, device: torch.device, ema: bool = False) -> tuple[ViTForImageClassification, dict]:
    """An eval-mode classifier on `device` and its `inference_info`, from a run folder, a training
    checkpoint or any pretrained source; ema=True takes a training file's EMA weights."""
    model = ViTForImageClassification.from_pretrained(path, ema=ema)
    return model.to(device).eval(), inference_info(model)


def inference_info(model: ViTForImageClassification) -> dict:
    """What the commands need beyond a loaded model's weights: `classes` (None without names), `mean`
    and `std`, the training run's `params` (None for a pretrained source), `image_size` and `channels`.

    mean/std come from the file (a training checkpoint, an HF folder's preprocessor_config.json), else
    0.5/0.5: the Google checkpoints' scaling to [-1, 1] (timm's ImageNet-1k DeiT-style files use other
    values), said out loud (a warning on the `vit` logger).
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
        logger.warning("%s states no normalization: assuming mean 0.5 and std 0.5 per channel (the Google checkpoints')",
                       report.path)
        mean, std = [0.5] * channels, [0.5] * channels
    return {"classes": [id2label[i] for i in sorted(id2label)] if id2label else None, "mean": mean, "std": std,
            "params": extras.get("params"), "image_size": config.image_size, "channels": channels}
