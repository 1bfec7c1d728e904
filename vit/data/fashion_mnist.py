"""Fashion-MNIST as uint8 arrays, read straight from the idx .gz files Debian ships (no image folders).

Source order: /usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`), else
torchvision's download into ~/.cache/vit/fashion-mnist ($XDG_CACHE_HOME when set), outside the
installed package. The "val" split is the official 10k test set.
"""

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from vit.errors import UserError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit" / "fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": "train", "val": "t10k"}


def read_idx(path):
    """One idx file (gzipped or not) -> numpy array; the header gives dtype and shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not a uint8 idx file (bad magic number); reinstall dataset-fashion-mnist.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} holds {data.size} bytes but its header says {shape}; the file is truncated.")
    return data.reshape(shape)


@lru_cache(maxsize=2)
def load_fashion_mnist(split):
    """split "train" (60k) or "val" (the 10k test set) -> (images uint8 (N, 28, 28), labels int64 (N,))."""
    assert split in _FILES, split
    stem = _FILES[split]
    images_path = DEBIAN_DIR / f"{stem}-images-idx3-ubyte.gz"
    labels_path = DEBIAN_DIR / f"{stem}-labels-idx1-ubyte.gz"
    if images_path.exists() and labels_path.exists():
        images, labels = read_idx(images_path), read_idx(labels_path)
    else:
        images, labels = _torchvision_download(split)
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise UserError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match.")
    return images, labels.astype(np.int64)


def _torchvision_download(split):
    """Fallback when the Debian package is absent: torchvision's downloader, cached in CACHE_DIR."""
    from torchvision.datasets import FashionMNIST
    try:
        ds = FashionMNIST(root=str(CACHE_DIR), train=(split == "train"), download=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, RuntimeError...)
        raise UserError(
            f"Fashion-MNIST is not in {DEBIAN_DIR} and torchvision could not download it ({type(e).__name__}); "
            f"install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)."
        ) from e
    return ds.data.numpy(), ds.targets.numpy()
