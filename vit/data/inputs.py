"""The images a command is given (`vit predict`, `attention`, `features`, `export --quantize`): paths
and folders as typed on the command line, to files, and a file to the tensor the model sees.

Apart from training's data (a folder of class folders, vit/data/folder.py): here any image files, in
the order given, a folder standing for the image files under it.
"""

import os
from typing import Mapping, Sequence

import torch

from vit.data.images import IMAGE_EXTENSIONS, open_image
from vit.data.transforms import eval_transform, resize_size
from vit.errors import UserError, special_file_kind


def image_arguments(paths: Sequence[str]) -> list[str]:
    """The images named on a command line: a folder stands for the image files under it; a FIFO, device
    or socket is refused before anything opens it. Other paths stay as given (predict says which it
    cannot read). Refused when that leaves no path at all (only empty folders)."""
    out = []
    for path in paths:
        kind = special_file_kind(path)
        if kind is not None:
            raise UserError(f"image {path} is {kind}, not an image file; pass image files or folders of them.")
        out += images_under(path) if os.path.isdir(path) else [path]
    if not out:
        raise UserError(f"no readable images in {', '.join(paths)}: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                        f"there; pass image files or folders that hold some.")
    return out


def images_under(folder: str) -> list[str]:
    """The image files under `folder`, sorted, hidden ones left out (as the training scan does)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints and the like
        files += [os.path.join(root, f) for f in names  # isfile: FIFOs and devices are left out, never opened
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".") and os.path.isfile(os.path.join(root, f))]
    return sorted(files)


def preprocess(path: str, info: Mapping) -> torch.Tensor:
    """Decode and eval-transform one image to (1, C, H, W) for a model whose `info` (factory.inference_info)
    gives image_size, channels, mean and std; data.images.BadImage if unreadable."""
    image = open_image(path, info["channels"], resize_to=resize_size(info["image_size"]))
    transform = eval_transform(info["image_size"], info["channels"], info["mean"], info["std"])
    return transform(image).unsqueeze(0)
