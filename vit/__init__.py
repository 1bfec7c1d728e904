"""A Vision Transformer from scratch, with Hugging Face's module names and state-dict keys."""

from vit.errors import UserError
from vit.model import (
    PRESETS,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

__all__ = ["PRESETS", "UserError", "ViTConfig", "ViTForImageClassification", "ViTModel"]
