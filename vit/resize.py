"""Resizing pretrained weights for another grid, patch size or channel count: pure torch, used by
the model (`interpolate_pos_encoding`) and by the loader (a new image_size, patch_size or num_channels).

References: timm's `resample_abs_pos_embed` and `resample_patch_embed` (timm.layers) and
`adapt_input_conv` (timm.models._manipulate); FlexiViT (Beyer et al. 2023).
"""

import math
from typing import Union

import torch
import torch.nn.functional as F

from vit.errors import UserError


def resample_pos_embed(posemb: torch.Tensor, size: Union[int, tuple[int, int]], antialias: bool = True,
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubic resampling of the patch grid to `size` (an int or (h, w)); the positions of the first
    `num_prefix_tokens` tokens (CLS, ...; 0 with no_embed_class) are kept as they are.

    The defaults are timm's resample_abs_pos_embed (used when loading); transformers'
    interpolate_pos_encoding is the same without antialias.
    """
    cls_pos, patch_pos = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]  # (1, prefix, D), (1, N, D)
    old = math.isqrt(patch_pos.shape[1])
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, old, old)
    patch_pos = F.interpolate(patch_pos, size=size, mode="bicubic", antialias=antialias, align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)  # (1, h*w, D)
    return torch.cat((cls_pos, patch_pos), dim=1)


def resample_patch_kernel(kernel: torch.Tensor, new_patch: int) -> torch.Tensor:
    """FlexiViT (Beyer et al. 2023): the kernel whose response to a resized patch equals the old one's.

    With R the (new_p^2, old_p^2) bicubic resize matrix, the new kernel is old @ pinv(R), so that
    <new, resize(x)> = <old, x> for every patch x (exactly for upsampling).
    """
    out_ch, in_ch, old_h, old_w = kernel.shape
    basis = torch.eye(old_h * old_w).reshape(-1, 1, old_h, old_w)  # one image per old pixel
    resized = F.interpolate(basis, size=(new_patch, new_patch), mode="bicubic", antialias=True, align_corners=False)
    resize = resized.reshape(old_h * old_w, -1).t()  # (new_p^2, old_p^2)
    new = kernel.float().reshape(out_ch, in_ch, -1) @ torch.linalg.pinv(resize)  # (O, C, new_p^2)
    return new.reshape(out_ch, in_ch, new_patch, new_patch).to(kernel.dtype)


# PIL's convert("L") (ITU-R 601-2 luma, in its own 16-bit fixed point): gray = these weights . (R, G, B); they sum to 1
LUMA = (19595 / 65536, 38470 / 65536, 7471 / 65536)


def adapt_input_channels(kernel: torch.Tensor, channels: int, path: str) -> torch.Tensor:
    """The patch kernel for another number of input channels (RGB weights for gray images, say).

    To 1 channel, as timm's adapt_input_conv: sum over the old channels, so a gray image gives what
    its copy on every RGB channel gave. From 1 channel to 3: the kernel times PIL's LUMA weights, so
    an RGB image gives what its gray version (as open_image makes it) gave, up to PIL's rounding to
    whole levels; to another count: repeat and divide by it (the channels' mean). Both hold for
    inputs normalized with one mean and std for every channel.
    """
    old = kernel.shape[1]  # (D, C, p, p)
    if channels == 1:
        return kernel.sum(dim=1, keepdim=True)
    if old == 1 and channels == 3:
        return kernel * torch.tensor(LUMA, dtype=kernel.dtype).view(1, 3, 1, 1)
    if old == 1:
        return kernel.repeat(1, channels, 1, 1) / channels
    raise UserError(f"checkpoint {path} has {old} input channels and cannot be adapted to {channels}; use num_channels={old} or 1.")
