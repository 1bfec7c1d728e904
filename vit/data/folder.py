"""ImageFolder layout: train/<class>/*, plus val/<class>/* or a seeded split; the bad-input policy.

Policy for bad input (one rule per kind, decided here for the whole project):
- refused before training, UserError naming them: a missing train/val folder, no class folders,
  a class folder with no usable image, val classes that differ from the train classes;
- skipped at scan time, with one notice (the `vit` logger) and a count in the report: files without an image
  extension, zero-byte files, files whose header PIL cannot identify (random bytes, text named .jpg),
  and decompression-bomb sizes. The scan reads headers only (PIL open without load), so it stays fast;
- dropped at load time, counted in the report (and, for loaders that decode during the epoch, in
  `loader.skipped`): files that pass the header check but fail to decode (truncated or corrupt
  data). They never stop an epoch.
Hidden files and folders (".DS_Store", "._x.jpg", ".ipynb_checkpoints") are ignored silently.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torchvision.transforms import functional as TF

from vit.data.images import IMAGE_EXTENSIONS, BadImage, check_header, open_image
from vit.errors import UserError

logger = logging.getLogger(__name__)
MAX_LISTED = 20  # file names kept in the report per kind; the counts are always complete


def record_dropped(report, messages):
    """Count files dropped at load time in the report, keeping at most MAX_LISTED of their messages."""
    report["dropped_at_load"] += len(messages)
    report["dropped_files"] += messages[:max(0, MAX_LISTED - len(report["dropped_files"]))]


@dataclass
class FolderSplit:
    """Scanned and split folder: (path, label) lists and what was skipped."""
    classes: list
    train: list
    val: list
    report: dict = field(default_factory=dict)


def scan_folder(train_dir, val_dir=None, *, val_split=None, split_seed=None, threads=8, keys=("data.train_dir", "data.val_dir"),
                quiet=False):
    """Scan train_dir (and val_dir), apply the policy above, and split when there is no val_dir
    (then val_split and split_seed say how: data.val_split and data.split_seed). `keys` name the two
    folders in messages: the params keys, or the option the user typed. The skipped files are one
    notice on the `vit` logger, unless `quiet` (a caller that scans the same folder again)."""
    if not train_dir:
        raise UserError(f"{keys[0]} is not set; point it at a folder with one sub-folder per class.")
    train_classes, train_files, skipped = _scan_root(Path(train_dir), keys[0], threads)
    if val_dir:
        same = Path(val_dir).resolve() == Path(train_dir).resolve()  # eval --data-dir: one folder, both sides
        val_classes, val_files, val_skipped = (train_classes, train_files, []) if same else _scan_root(Path(val_dir), keys[1], threads)
        skipped += val_skipped
        if val_classes != train_classes:
            missing = sorted(set(train_classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(train_classes))
            raise UserError(f"{val_dir} must have the same class folders as {train_dir}: "
                            f"missing {missing or 'none'}, extra {extra or 'none'}.")
        train = [(p, y) for y, c in enumerate(train_classes) for p in train_files[c]]
        val = [(p, y) for y, c in enumerate(train_classes) for p in val_files[c]]
    else:
        assert val_split is not None and split_seed is not None, "without val_dir, pass val_split and split_seed"
        train, val = _split(train_classes, train_files, val_split, split_seed)
    if skipped:
        listed = "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        if not quiet:
            logger.warning("skipped %d file(s) that are not usable images: %s", len(skipped), listed)
    report = {"train_files": len(train), "val_files": len(val), "skipped_at_scan": len(skipped),
              "skipped_files": skipped[:MAX_LISTED]}
    return FolderSplit(train_classes, train, val, report)


def _scan_root(root, key, threads):
    """root/<class>/** -> (classes, {class: [good paths]}, [skip messages]); refuses empty classes."""
    classes = class_folders(root, key)
    candidates = {c: sorted(p for p in (root / c).rglob("*") if p.is_file() and not _hidden(p, root)) for c in classes}
    flat = [p for c in classes for p in candidates[c]]
    with ThreadPoolExecutor(threads) as pool:  # header reads are I/O bound; threads overlap them
        problems = list(pool.map(_problem, flat))
    bad = {p: msg for p, msg in zip(flat, problems) if msg}
    files = {c: [p for p in candidates[c] if p not in bad] for c in classes}
    empty = [str(root / c) for c in classes if not files[c]]
    if empty:
        raise UserError(f"class folder(s) {', '.join(empty)} have no usable images; add images or remove the folder.")
    return classes, files, list(bad.values())


def class_folders(root, key):
    """The sorted class folder names under `root` (hidden ones left out), refused unless there are two or
    more: one class trains to val_acc 1.0 and learns nothing. `key` names the folder in the sentence."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{key} {root} is not a folder; it must hold one sub-folder per class.")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{key} {root} has no class sub-folders; put the images in {root}/<class>/.")
    if len(classes) == 1:
        raise UserError(f"{key} {root} has one class folder ({classes[0]}), and a classifier needs two or more: "
                        f"every image would be right, and nothing learned; add a folder per class.")
    return classes


def _hidden(path, root):
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _problem(path):
    """None for a plausible image, else a short reason (no pixel decode)."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"{path}: not an image extension"
    try:
        check_header(path)
    except BadImage as e:
        return str(e)
    return None


def _split(classes, files, val_split, seed):
    """Per-class seeded split: round(n * val_split) of each class to val, at least one left to train."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for y, c in enumerate(classes):
        paths = files[c]
        order = rng.permutation(len(paths))
        n_val = min(int(round(len(paths) * val_split)), len(paths) - 1)
        val += [(paths[i], y) for i in sorted(order[:n_val])]
        train += [(paths[i], y) for i in sorted(order[n_val:])]
    return train, val


def decode_all(samples, channels, size, threads=8):
    """[(path, label)] -> (uint8 (N, C, size, size), labels (N,), [messages of files that failed]).

    Each image gets the eval framing before the crop: shorter side resized to `size`, center crop.
    """
    def one(sample):
        try:
            im = open_image(sample[0], channels, size_hint=size, resize_to=size)
        except BadImage as e:
            return str(e)
        im = TF.center_crop(TF.resize(im, size, interpolation=TF.InterpolationMode.BICUBIC), size)
        a = np.asarray(im, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, size, size)

    with ThreadPoolExecutor(threads) as pool:  # PIL releases the GIL while decoding and resizing
        out = list(pool.map(one, samples))
    keep = [i for i, a in enumerate(out) if not isinstance(a, str)]
    images = np.stack([out[i] for i in keep]) if keep else np.zeros((0, channels, size, size), np.uint8)
    labels = np.array([samples[i][1] for i in keep], dtype=np.int64)
    return images, labels, [a for a in out if isinstance(a, str)]
