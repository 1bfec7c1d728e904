"""train.cache_features: a linear probe runs its frozen backbone once, not once per epoch.

With train.freeze_backbone the backbone never changes, so the pooled vector the head reads (what
`forward_head(pre_logits=True)` and `vit features` give) is extracted once per image, in the run's
precision, and the head trains over the cache for every epoch:

- what is cached: each train image as the training loader shows it with augmentation off (one view per
  image: vit/params.py refuses the cache with augmentation on), and each val image as evaluation sees it;
  float32, (images x hidden_size), counted before anything is allocated and refused past LIMIT_BYTES;
- the epochs: `CachedLoader` serves the rows in the order and batches the image loader would
  (vit/data/sampler.py), so the head trains on what an uncached probe with augmentation off trains
  on, and resume stays exact;
- where it lives: in memory, and in the run folder as features.safetensors with a stamp of what made it
  (the backbone's weights, the data, the precision), which a resumed run reads back instead of
  extracting again; under torchrun each process keeps its own in memory and a resume extracts again;
- evaluation reads the cached val rows, except the end-of-run report's pass, which runs the whole model
  on the val images (its grid shows misclassified images), vit/train/loop.py's `val_pass`.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from vit import data, distributed, evaluation
from vit.data.sampler import num_batches, shard_indices, shard_size
from vit.errors import UserError
from vit.files import atomic_write
from vit.loading.core import is_file
from vit.model import ViTForImageClassification
from vit.outputs import ImageClassifierOutput
from vit.precision import autocast
from vit.run_folder import FEATURES, LAST
from vit.train.report import writing

LIMIT_BYTES = 2 * 1024**3  # the cache's size at most: (train + val images) x hidden_size x 4 bytes
STAMP_VERSION = 1  # what a features.safetensors must say to be read back


class HeadOnly(torch.nn.Module):
    """The classifier alone as a model: pooled features (B, D) -> ImageClassifierOutput(logits), what the
    whole model computes after its backbone."""

    def __init__(self, model: ViTForImageClassification):
        super().__init__()
        self.classifier = model.classifier

    def forward(self, pooled: torch.Tensor) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.classifier(pooled))


class CachedLoader:
    """An image loader's interface (set_epoch, len, iter, samples, skipped) over cached rows: the same
    shuffle, shard and batches as data.TensorLoader and data.WorkerLoader, from the same (seed, epoch)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int, train: bool,
                 rank: int = 0, world_size: int = 1):
        self.features, self.labels = features, labels  # (N, D) float32, (N,) int64, on the training device
        self.batch_size, self.seed, self.train, self.rank, self.world_size = batch_size, seed, train, rank, world_size
        self.epoch = 0
        self.skipped = 0  # a broken file was dropped at extraction, never later

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def samples(self):
        return len(self.features)

    def __len__(self):
        n = shard_size(len(self.features), self.rank, self.world_size, self.train)
        return num_batches(n, self.batch_size, drop_last=self.train)

    def __iter__(self):
        idx = shard_indices(len(self.features), self.seed, self.epoch, self.rank, self.world_size, self.train)
        idx = idx.to(self.features.device)
        for b in range(len(self)):
            sl = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.features[sl], self.labels[sl]


@dataclass
class FeatureCache:
    """The run's cached features: the epochs' train loader, the per-epoch evaluation's val rows, and a
    note printed under the cost line on what was cached."""

    train: CachedLoader
    val: Optional[CachedLoader]
    note: str

    def evaluate(self, model: ViTForImageClassification, **kw) -> dict:
        """evaluation.evaluate of `model`'s head over the cached val rows (`kw` as for evaluate, no report)."""
        return evaluation.evaluate(HeadOnly(model), self.val, **kw)


def check(model: ViTForImageClassification, loaders: data.Loaders) -> int:
    """The cache's size in bytes, refused in one sentence past LIMIT_BYTES or for a head it cannot feed;
    before anything is extracted or allocated."""
    if model.distillation_classifier is not None:
        raise UserError("params key train.cache_features caches the one pooled vector a head reads, but this distilled "
                        "model (DeiT) has two heads reading two tokens; set train.cache_features to false.")
    images = loaders.train.samples + (loaders.report["val_files"] if loaders.val is not None else 0)
    size = images * model.config.hidden_size * 4
    if size > LIMIT_BYTES:
        raise UserError(f"params key train.cache_features would hold {images:,} images x {model.config.hidden_size} floats "
                        f"({_size(size)}), above the cache's limit of {_size(LIMIT_BYTES)}; train on "
                        f"fewer images or set train.cache_features to false.")
    return size


def build(params: dict, loaders: data.Loaders, model: ViTForImageClassification, precision: str,
          d: distributed.Dist) -> FeatureCache:
    """The cache for this run: read back from the run folder when its stamp matches, else extracted (and
    saved there when one process runs). Prints one line on what it cached and where."""
    t, out = params["train"], params["output"]["dir"]
    size = check(model, loaders)
    path = os.path.join(out, FEATURES)
    stamp = {"version": STAMP_VERSION, "backbone": backbone_digest(model), "precision": precision,
             "data": params["data"], "batch_size": t["batch_size"], "seed": t["seed"],
             "images": [loaders.train.samples, loaders.report["val_files"] if loaders.val is not None else 0]}
    tensors, replaced = read(path, stamp) if d.world_size == 1 else (None, "")
    if tensors is not None:
        how = f"read back from {path}, extraction skipped"
    else:
        t0 = time.perf_counter()
        tensors = extract(model, loaders, precision, d, t["batch_size"])
        elapsed = time.perf_counter() - t0
        images = len(tensors["train"]) + len(tensors.get("val", ()))
        how = f"extracted in {precision} in {elapsed:.0f} s ({images / max(elapsed, 1e-9):.1f} images/s)"
        if d.world_size == 1:
            save(path, tensors, stamp, os.path.join(out, LAST))
    done = f"{len(tensors['train']):,} train + {len(tensors.get('val', ())):,} val images {how}"
    where = f"in memory and {path}" if d.world_size == 1 else "in memory (one per process under torchrun)"
    print(f"feature cache: {done}; {_size(size)} of float32 ({model.config.hidden_size} per image), {where}{replaced}")
    train = CachedLoader(tensors["train"].to(d.device), tensors["train_labels"].to(d.device), batch_size=t["batch_size"],
                         seed=t["seed"], train=True, rank=d.rank, world_size=d.world_size)
    val = None
    if "val" in tensors:  # this process's val rows, in the val loader's order and batch size
        val = CachedLoader(tensors["val"].to(d.device), tensors["val_labels"].to(d.device), batch_size=t["batch_size"],
                           seed=t["seed"], train=False)
    return FeatureCache(train, val, f"feature cache: each epoch trains the head alone, over the cached features ({done})")


@torch.no_grad()
def extract(model: ViTForImageClassification, loaders: data.Loaders, precision: str, d: distributed.Dist,
            batch_size: int) -> dict:
    """{"train", "train_labels"[, "val", "val_labels"]}: the pooled features of every train image (its
    training view, in index order) and of this process's val images (in the val loader's order), float32
    on the CPU."""
    model.eval()
    train = loaders.train.samples
    parts = [("train", loaders.train.in_order(), train, num_batches(train, batch_size, drop_last=False))]
    if loaders.val is not None:
        val = shard_size(loaders.val.samples, d.rank, d.world_size, shuffle=False)
        parts.append(("val", iter(loaders.val), val, len(loaders.val)))
    out = {}
    for name, batches, count, total in parts:
        rows = torch.empty(count, model.config.hidden_size, device=d.device)  # the size check's count
        labels, filled = [], 0
        for x, y in tqdm(batches, desc=f"extracting {name} features", total=total, disable=not d.is_main, leave=False,
                         dynamic_ncols=True):
            with autocast(d.device, precision):
                f = model.forward_head(model.forward_features(x.to(d.device, non_blocking=True)), pre_logits=True)
            rows[filled:filled + len(f)] = f.float()
            labels.append(y.to(d.device))
            filled += len(f)
        out[name] = rows[:filled].cpu()  # fewer than `count` when a broken file was dropped
        out[f"{name}_labels"] = torch.cat(labels).cpu() if labels else torch.empty(0, dtype=torch.long)
    return out


def _size(n: int) -> str:
    """'4.5 KiB', '5.9 MiB', '2.0 GiB'."""
    shift, unit = next((s, u) for s, u in ((30, "GiB"), (20, "MiB"), (10, "KiB")) if n >= 2**s or s == 10)
    return f"{n / 2**shift:.1f} {unit}"


def backbone_digest(model: ViTForImageClassification) -> str:
    """sha256 of the backbone's weights (the frozen part), in key order: the stamp's word on what made the features."""
    h = hashlib.sha256()
    for key, tensor in model.vit.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def read(path: str, stamp: dict) -> tuple[Optional[dict], str]:
    """(the cached tensors, "") when `path` holds a cache with this `stamp`, else (None, a note on why the file
    there is replaced, or "" when there is none)."""
    if not is_file(path):
        return None, ""
    try:
        with safe_open(path, framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("stamp", "null"))
            if saved != json.loads(json.dumps(stamp)):
                return None, " (replacing the one there, made from another backbone, data or precision)"
            return {k: f.get_tensor(k) for k in f.keys()}, ""
    except (SafetensorError, OSError, ValueError) as e:
        return None, f" (replacing the one there, which could not be read: {type(e).__name__})"


def save(path: str, tensors: dict, stamp: dict, last_path: str) -> None:
    """Write the cache with its stamp, atomically (a kill leaves the old file or none)."""
    blob = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"stamp": json.dumps(stamp)})
    with writing(path, last_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, lambda f: f.write(blob))
