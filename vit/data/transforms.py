"""PIL -> normalized float tensor transforms for the worker loader, and the eval geometry shared with
the tensor loader.

Eval geometry: resize the shorter side to image_size / crop_pct, then center crop image_size.
crop_pct is 0.875 (the timm/DeiT default) for image_size >= 96, and 1.0 for smaller images (28x28
Fashion-MNIST has no border to spare: it is seen whole). The tensor loader stores images resized to
that shorter side (center square) and takes the same center fraction on the device, so eval sees the
same framing in every loader. Training crops differ slightly: the tensor loader draws its random
resized crops from that stored center square, the file loaders from the whole original image (the
same for square images such as Fashion-MNIST's).
"""

import copy
import math

from PIL import Image
from torchvision import transforms as T

from vit.errors import UserError


MSTD_REACH = 6  # RandAugment's gaussian magnitudes are probed this many std from the mean (1e-9 per draw beyond)


def crop_pct(image_size):
    """Fraction of the resized image kept by the eval center crop."""
    return 0.875 if image_size >= 96 else 1.0


def resize_size(image_size):
    """Shorter side after the eval resize (before the center crop)."""
    return int(math.floor(image_size / crop_pct(image_size)))


def eval_transform(image_size, channels, mean, std):
    """PIL image ("L" or "RGB") -> float tensor (C, image_size, image_size), normalized."""
    return T.Compose([
        _ToChannels(channels),
        T.Resize(resize_size(image_size), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def train_transform(image_size, channels, mean, std, *, scale, hflip, randaugment=None):
    """Random resized crop, flip, optional timm RandAugment (e.g. "rand-m9-mstd0.5"), then normalize."""
    ops = [
        _ToChannels(channels),
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
    ]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if randaugment:
        ops.append(rand_augment(randaugment, image_size, channels, mean))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def rand_augment(spec, image_size, channels, mean):
    """timm's RandAugment for a string like "rand-m9-mstd0.5", each of its ops tried once on a small
    image at the lowest and highest magnitude it can draw (mean +- MSTD_REACH std, clipped as timm
    clips): a string timm parses but cannot run is refused here, at validation, instead of in some
    training step ("rand-inc1" posterizes to 0 bits, which Pillow refuses). UserError when it fails."""
    from timm.data.auto_augment import rand_augment_transform

    fill = tuple(round(255 * m) for m in mean)  # rotate/shear fill with the mean colour, as timm does
    probe = Image.new("L" if channels == 1 else "RGB", (8, 8), fill if channels == 3 else fill[0])
    trial = None
    try:
        transform = rand_augment_transform(spec, dict(translate_const=int(image_size * 0.45), img_mean=fill))
        for op in transform.ops:
            top = op.magnitude_max or 10  # timm clips every drawn magnitude to [0, top]
            std = op.magnitude if op.magnitude_std == math.inf else op.magnitude_std * MSTD_REACH  # inf: uniform(0, m)
            for magnitude in {max(0.0, min(op.magnitude - std, top)), max(0.0, min(op.magnitude + std, top))}:
                trial = copy.copy(op)
                trial.prob, trial.magnitude, trial.magnitude_std = 1.0, magnitude, 0
                trial(probe)
    except Exception as e:  # noqa: BLE001  timm asserts, int()s or fails inside an op: any of it means "cannot run"
        where = f" in {trial.name} at magnitude {trial.magnitude:g}" if trial is not None else ""
        raise UserError(f"train.randaugment {spec!r} is not a RandAugment string timm can run ({type(e).__name__}{where}: "
                        f"{str(e)[:120]}); use one like \"rand-m9-mstd0.5\" or null.") from None
    return transform


class _ToChannels:
    """Make sure the PIL image has the mode the model expects (a no-op after open_image)."""

    def __init__(self, channels):
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, im: Image.Image):
        return im if im.mode == self.mode else im.convert(self.mode)

    def __repr__(self):
        return f"ToChannels({self.mode})"
