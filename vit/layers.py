"""The functional pieces the blocks in vit/model.py are made of that are not the ViT's own: the
activation for each `hidden_act` (transformers' activations.py), stochastic depth (timm's
layers/drop.py) and patch dropout (timm's layers/patch_dropout.py).
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


class PatchDropout(nn.Module):
    """timm's PatchDropout (Liu et al., 2022; FLIP, Li et al., 2023): while training, each image keeps a
    random `1 - prob` share of its patch tokens, the prefix tokens (class, registers) always, so a
    step costs about that share. A no-op in eval mode and at prob 0. It holds no weights: the training
    loop sets `prob` for each epoch (train.patch_dropout)."""

    def __init__(self, num_prefix_tokens: int, prob: float = 0.0):
        super().__init__()
        self.num_prefix_tokens, self.prob = num_prefix_tokens, prob

    def forward(self, x):  # (B, prefix+N, D) -> (B, prefix+keep, D)
        if not self.training or self.prob == 0.0:
            return x
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        B, N, D = patches.shape
        keep = torch.randn(B, N, device=x.device).argsort(dim=-1)[:, :max(1, int(N * (1.0 - self.prob)))]  # (B, keep)
        return torch.cat((prefix, patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))), dim=1)
