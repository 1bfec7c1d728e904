"""`vit shards SOURCE --out DIR [--per-shard N]`: an image folder or Fashion-MNIST written as webdataset
tar shards, DIR/train-000000.tar ... and DIR/val-000000.tar ... where the source has a held-out split,
with DIR/shards.json (the class names, each shard's sample count) that data.dataset "webdataset" reads.

A sample is `<key>.<image extension>` (a folder's file as it is, its bytes untouched; Fashion-MNIST as
PNG) and `<key>.cls` (the class number as text), the layout timm's and open_clip's webdataset readers
use. A folder's bad files are skipped and counted by the folder policy (vit/data/folder.py) before
anything is written; SOURCE/train and SOURCE/val, when both exist, are the two splits, else SOURCE is
the train split alone.
"""

import io
import json
import os
import random
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image

from vit.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from vit.data.fashion_mnist import load_fashion_mnist
from vit.data.folder import scan_folder
from vit.data.shards import INDEX
from vit.errors import UserError

FASHION_MNIST = "fashion-mnist"


@dataclass
class Written:
    """What `write_shards` wrote: per split the shard files and sample count, the classes and the folder policy's skips."""

    out: str
    classes: list
    shards: dict = field(default_factory=dict)  # split -> [file names]
    samples: dict = field(default_factory=dict)  # split -> count
    skipped: list = field(default_factory=list)  # the folder policy's messages

    def pattern(self, split: str) -> str:
        """The brace pattern naming the split's shards."""
        n = len(self.shards[split])
        return os.path.join(self.out, f"{split}-000000.tar" if n == 1 else f"{split}-{{000000..{n - 1:06d}}}.tar")


def write_shards(source: str, out: str, per_shard: int = 1000) -> Written:
    """Write SOURCE (an image folder, or "fashion-mnist") into `out` as tar shards of `per_shard` samples."""
    if per_shard < 1:
        raise UserError(f"--per-shard {per_shard} must be 1 or more.")
    if source == FASHION_MNIST:
        classes = list(FASHION_MNIST_CLASSES)
        splits = {name: _arrays(*load_fashion_mnist(name)) for name in ("train", "val")}
        skipped = []
    else:
        if not os.path.isdir(source):
            raise UserError(f"shards source {source} is neither a folder nor \"{FASHION_MNIST}\"; give an image folder "
                            f"(one sub-folder per class, or train/ and val/ holding them).")
        both = all(os.path.isdir(os.path.join(source, s)) for s in ("train", "val"))
        train_dir, val_dir = (os.path.join(source, "train"), os.path.join(source, "val")) if both else (source, None)
        split = scan_folder(train_dir, val_dir, val_split=0.0, split_seed=0, keys=("SOURCE", "SOURCE/val"))  # 0: all to train
        classes, skipped = split.classes, split.report["skipped_files"]
        # a scan lists class after class: shuffled (seeded) so that each shard holds every class
        splits = {"train": _files(_shuffled(split.train)), **({"val": _files(split.val)} if both else {})}
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out} cannot be made a folder ({e.strerror}); choose another.") from None
    written = Written(out, classes, skipped=skipped)
    counts = {}
    for name, samples in splits.items():
        written.shards[name], written.samples[name] = [], 0

        def finished(path, name=name):  # ShardWriter calls it as each shard closes, its count still set
            written.shards[name].append(os.path.basename(path))
            counts[os.path.basename(path)] = writer.count

        writer = wds.ShardWriter(os.path.join(out, f"{name}-%06d.tar"), maxcount=per_shard, maxsize=float("inf"),
                                 post=finished, verbose=0)
        with writer:
            for i, (ext, data, label) in enumerate(samples):
                writer.write({"__key__": f"{name}{i:09d}", ext: data, "cls": str(label).encode()})
                written.samples[name] += 1
    with open(os.path.join(out, INDEX), "w", encoding="utf-8") as f:
        json.dump({"classes": classes, "samples": counts}, f, indent=1)
    return written


def _arrays(images, labels):
    """Fashion-MNIST's (N, 28, 28) uint8 and labels -> (ext, PNG bytes, label) one at a time."""
    for image, label in zip(images, labels):
        buf = io.BytesIO()
        Image.fromarray(image, "L").save(buf, "PNG")
        yield "png", buf.getvalue(), int(label)


def _shuffled(samples):
    samples = list(samples)
    random.Random(0).shuffle(samples)
    return samples


def _files(samples):
    """[(path, label)] -> (ext, the file's bytes, label) one at a time."""
    for path, label in samples:
        with open(path, "rb") as f:
            yield os.path.splitext(str(path))[1].lstrip(".").lower(), f.read(), label
