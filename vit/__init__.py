"""A Vision Transformer from scratch, with Hugging Face's module names and state-dict keys.

    from vit import ViTForImageClassification, ViTModel, ViTConfig, PRESETS, UserError

The model classes are imported on first use (PEP 562), so `import vit` loads no torch: the command
line (vit/cli.py) sets OMP_WAIT_POLICY before torch loads, and libgomp reads it only then.
"""

import importlib

from vit.config import PRESETS, ViTConfig
from vit.errors import UserError

_LAZY = {"ViTForImageClassification": "vit.model", "ViTModel": "vit.model"}

__all__ = ["PRESETS", "UserError", "ViTConfig", "ViTForImageClassification", "ViTModel"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'vit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
