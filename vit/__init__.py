"""A Vision Transformer from scratch, with Hugging Face's module names and state-dict keys."""

from vit.config import PRESETS, ViTConfig
from vit.errors import UserError
from vit.model import ViTForImageClassification, ViTModel

__all__ = ["PRESETS", "UserError", "ViTConfig", "ViTForImageClassification", "ViTModel"]
