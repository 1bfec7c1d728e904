"""The functional pieces the blocks in vit/model.py are made of that are not the ViT's own: the
activation for each `hidden_act` (transformers' activations.py) and stochastic depth (timm's
layers/drop.py).
"""

import torch
import torch.nn as nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (HF's quick_gelu)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# config.hidden_act -> its module, one entry per name in vit.config.ACTIVATIONS
ACT2FN = {
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "quick_gelu": QuickGELU,
}


def drop_path(x, p, training):
    """Stochastic depth: zero a sample's whole residual branch with probability p, scale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)
