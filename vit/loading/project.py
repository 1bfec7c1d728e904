"""This project's own files: a run's training checkpoints (last.pt, best.pt: the weights under `model`
with their config, the optimizer, RNG states, progress, params, classes, mean/std) and a run folder,
which stands for its best.pt, else its last.pt. Resume (vit/train/checkpoint.py) reads last.pt here too.

Their tensors carry our names already (HF's), so there is no rename table: the config saved beside
them is checked against the shapes instead.
"""

import os

from vit.config import ViTConfig
from vit.errors import UserError
from vit.loading.core import Source, checked_normalization, config_fields, is_file, read_file
from vit.run_folder import BEST, LAST

KIND = "training checkpoint"  # the Source.kind


def is_training_checkpoint(obj) -> bool:
    """This project's last.pt / best.pt: the weights under `model`, their config beside them."""
    return isinstance(obj, dict) and all(isinstance(obj.get(k), dict) for k in ("model", "config"))


def is_ours(obj) -> bool:
    """A training checkpoint of this project: its config says model_type "vit" (a foreign {"model",
    "config"} file, a training script's arguments beside its weights, is read by its shapes)."""
    return is_training_checkpoint(obj) and obj["config"].get("model_type") == "vit"


def read_training_checkpoint(path: str) -> dict:
    """All of a run's last.pt or best.pt (weights, optimizer, RNG states, progress); anything else is refused."""
    obj = read_file(path)
    if not is_training_checkpoint(obj):
        raise UserError(f"checkpoint {path} is not a training checkpoint of this project (no model/config entries); pass a run's last.pt or best.pt.")
    return obj


def run_checkpoint(path: str) -> str:
    """A run folder stands for its best.pt (else its last.pt); any other path for itself."""
    if os.path.isdir(path):
        for name in (BEST, LAST):
            if is_file(os.path.join(path, name)):
                return os.path.join(path, name)
    return path


def from_training_checkpoint(obj: dict, state: dict, path: str, notes: list) -> Source:
    """A training checkpoint's weights (`vit.` already stripped) with the config saved beside them,
    checked against the shapes, and what it carries for inference."""
    try:
        known = ViTConfig.from_hf_dict(obj["config"])
    except (TypeError, ValueError) as e:  # UserError is a ValueError
        raise UserError(f"checkpoint {path} carries a config this model cannot read ({e}); pass its best_hf folder instead.") from None
    extras = run_extras(obj, path, known.num_labels)
    return Source(state, config_fields(known, state, path, f"checkpoint {path}: its config"), KIND, extras, notes)


def run_extras(obj: dict, path: str, num_labels: int) -> dict:
    """What a training checkpoint carries for inference (mean and std, the run's params), each checked:
    a wrong type here would fail later, far from the file. Its class names (the config's id2label names
    them for the commands) must be a list of `num_labels` names too: anything else is a damaged file."""
    extras = {}
    classes = obj.get("classes")
    if "classes" in obj and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) == num_labels):
        raise UserError(f"checkpoint {path} carries classes {str(classes)[:80]}, not a list of its {num_labels} class names; "
                        f"it is damaged or not this project's: pass its best_hf folder instead.")
    if "mean" in obj or "std" in obj:
        extras.update(checked_normalization(obj.get("mean"), obj.get("std"), f"checkpoint {path}"))
    params = obj.get("params")
    if params is not None:
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            raise UserError(f"checkpoint {path} carries params that are not sections of keys ({str(params)[:80]}); "
                            f"it is damaged or not this project's: pass its best_hf folder instead.")
        extras["params"] = params
    return extras

