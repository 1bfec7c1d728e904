"""Streamed tar shards, data.dataset "webdataset": the `webdataset` package reads the tars (a sample is
the members sharing a key: an image and its `cls`), split by rank and then by worker, each worker's
shards in a shuffled order with a shuffle buffer over their samples. No folder scan: ranks open only
their own shards.

An epoch, exactly:
- rank r reads shards r, r + W, r + 2W, ... of the list (W ranks), and its worker k of K every K-th of
  those; the split is the same every epoch (the order within a worker and the buffer's draws are not),
  so no sample is seen twice in an epoch across ranks and workers;
- shards.json beside the shards (`vit shards` writes it) names the classes and counts each shard's
  samples, so every worker knows its share: `floor(its samples / batch)` full batches; a rank trains on
  the least any rank holds, at most data.train_samples / (W x batch); the rest of each worker's share (a
  partial batch, and what a larger share holds beyond the least) is the epoch's stated remainder, which
  the start-up line counts;
- a bad sample (a corrupt image, an unknown or missing class, no image) is skipped and counted like a
  bad file in a folder, and a truncated or damaged tar ends that shard, counted; the next samples fill
  their places, and a worker left short by damage replays its own samples to its share, so every rank
  still takes the same number of steps and none waits for another;
- everything a worker does is a function of (seed, epoch, rank, worker), so a resumed epoch reads and
  decodes its first steps' batches again and drops them, and then trains on exactly what the
  interrupted epoch would have (the cost: reading those batches once more).
Validation reads every sample of data.val_shards once over the ranks, in order, nothing left out.
"""

import json
import os
import random
import warnings
from itertools import islice

import braceexpand
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vit.data.images import BadImage, open_image_bytes
from vit.data.worker_loader import WorkerLoader, _worker_init, collate_drop_bad, seeded
from vit.errors import UserError

INDEX = "shards.json"  # beside the shards: {"classes": [names], "samples": {"train-000000.tar": count, ...}}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")


def expand(spec, key: str) -> list:
    """data.train_shards / data.val_shards (a brace pattern or a list of them) -> the tar paths, which must exist."""
    paths = [p for s in (spec if isinstance(spec, list) else [spec]) for p in braceexpand.braceexpand(s)]
    if not paths:
        raise UserError(f"params key {key} names no shard; give a brace pattern such as \"d/train-{{000000..000009}}.tar\" "
                        f"or a list of tar paths.")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"params key {key} names {len(missing)} shard(s) that are not files, e.g. {missing[0]}; "
                        f"check the pattern (vit shards prints it).")
    return paths


def read_index(paths: list, key: str) -> tuple[list, list]:
    """(class names, samples per shard) from the shards.json beside each shard."""
    indexes, classes, counts = {}, None, []
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in indexes:
            index_path = os.path.join(folder, INDEX)
            try:
                with open(index_path, encoding="utf-8") as f:
                    indexes[folder] = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"{index_path} cannot be read ({e}); shards for params key {key} need it beside them "
                                f"({{\"classes\": [names], \"samples\": {{shard file: count}}}}, as vit shards writes it).") from None
        index = indexes[folder]
        names, samples = index.get("classes"), index.get("samples", {})
        if classes is not None and names != classes:
            raise UserError(f"the shards of params key {key} disagree on their classes ({os.path.join(folder, INDEX)}); "
                            f"write them from one source.")
        classes = names
        count = samples.get(os.path.basename(path)) if isinstance(samples, dict) else None
        if not isinstance(count, int) or count < 0:
            raise UserError(f"{os.path.join(folder, INDEX)} gives no sample count for {os.path.basename(path)}; "
                            f"write the shards with vit shards, or add the count.")
        counts.append(count)
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{os.path.join(folder, INDEX)} has no list of class names under \"classes\"; add one.")
    return classes, counts


def decode(sample: dict, classes: int, channels: int, resize_to: int):
    """A webdataset sample -> (PIL image, class), or a message saying why it is skipped."""
    name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    image = next((k for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        return f"{name}: no image member ({', '.join(k for k in sample if not k.startswith('__'))})"
    try:
        label = int(sample.get("cls", b"").decode())
    except (ValueError, UnicodeDecodeError):
        return f"{name}: no class number in its cls member"
    if not 0 <= label < classes:
        return f"{name}: class {label} is not one of the {classes} classes in {INDEX}"
    try:
        return open_image_bytes(f"{name}.{image}", sample[image], channels, resize_to=resize_to), label
    except BadImage as e:
        return str(e)


class ShardStream(IterableDataset):
    """Batches ((x, y) or None, [messages]) from this rank's share of the shards; see the module docstring."""

    def __init__(self, paths, counts, classes, transform, *, channels, resize_to, batch_size, seed, rank, world_size,
                 train, workers, buffer):
        self.paths, self.counts, self.classes, self.transform = list(paths), list(counts), classes, transform
        self.channels, self.resize_to, self.batch_size, self.seed = channels, resize_to, batch_size, seed
        self.rank, self.world_size, self.train, self.workers, self.buffer = rank, world_size, train, max(workers, 1), buffer
        self.epoch = 0

    def share(self, rank, worker):
        """Indices of the shards that `worker` of `rank` reads."""
        return list(range(len(self.paths)))[rank::self.world_size][worker::self.workers]

    def quota(self, rank, worker):
        """Full batches that `worker` of `rank` yields per epoch."""
        return sum(self.counts[i] for i in self.share(rank, worker)) // self.batch_size

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shards = self.share(self.rank, worker)
        quota = self.quota(self.rank, worker) if self.train else None
        batch, bad, done, replay = [], [], 0, 0
        while shards and (quota is None or done < quota):
            good_before = done * self.batch_size + len(batch)
            for item in self._samples(shards, worker, replay):
                if isinstance(item, str):
                    bad.append(item)
                    continue
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield collate_drop_bad(batch)[0], bad
                    batch, bad, done = [], [], done + 1
                    if done == quota:
                        return
            if quota is None or done * self.batch_size + len(batch) == good_before:
                break  # validation reads once; a training share with no good sample at all cannot be made up
            replay += 1  # damage left this worker short of its share: its own samples again, another order
        if batch or bad:
            yield (collate_drop_bad(batch)[0] if batch else None), bad

    def _samples(self, shards, worker, replay):
        """(image tensor, label) per good sample and a message per bad one, in this epoch's order."""
        rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, replay]).generate_state(1)[0]))
        order = [self.paths[i] for i in shards]
        if self.train:
            rng.shuffle(order)
        damaged = []

        def damage(exn):  # webdataset's handler: a truncated or unreadable tar ends that shard, counted
            words = [a for a in exn.args if isinstance(a, str)]  # (what, ..., the shard webdataset adds)
            where = words[-1] if len(words) > 1 else "a shard"
            damaged.append(f"{where}: damaged tar ({words[0] if words else type(exn).__name__}); the rest of it is skipped")
            return True

        stages = [wds.SimpleShardList(order), wds.tarfile_to_samples(handler=damage)]
        if self.train:
            stages.append(wds.shuffle(self.buffer, initial=min(self.buffer, 100), rng=rng))
        for sample in wds.DataPipeline(*stages):
            yield from damaged
            damaged.clear()
            item = decode(sample, len(self.classes), self.channels, self.resize_to)
            if isinstance(item, str):
                yield item
                continue
            with seeded(rng.getrandbits(62)):  # closed before the yield: the trainer's RNG is its own between samples
                x = self.transform(item[0])
            yield x, item[1]
        yield from damaged


class ShardLoader(WorkerLoader):
    """A WorkerLoader (bad samples counted and reported once) over a ShardStream; a training epoch is
    `len(self)` full batches on every rank."""

    def __init__(self, stream: ShardStream, train_samples, *, device, workers, report):
        self.stream, self.device, self.report = stream, torch.device(device), report
        self.finish, self.skipped, self.dropped = self._to_device, 0, set()
        self.train_samples = train_samples if train_samples is not None else sum(stream.counts)
        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
                                 worker_init_fn=_worker_init, prefetch_factor=4 if workers > 0 else None)

    def set_epoch(self, epoch):
        self.stream.epoch = epoch

    @property
    def samples(self):
        return self.train_samples

    def __len__(self):
        s = self.stream
        if not s.train:  # every sample, a partial batch per worker at its end (fewer when samples are bad)
            return sum(-(-sum(s.counts[i] for i in s.share(s.rank, w)) // s.batch_size) for w in range(s.workers))
        least = min(sum(s.quota(r, w) for w in range(s.workers)) for r in range(s.world_size))
        return min(least, self.train_samples // (s.world_size * s.batch_size))

    def _finished(self):
        batches = super()._finished()
        return islice(batches, len(self)) if self.stream.train else batches


def loaders_from_shards(data_params: dict, batch_size: int, seed: int, rank: int, world_size: int, transforms: tuple,
                        resize_to: int, device, report: dict):
    """(train ShardLoader, val ShardLoader or None, classes) for data.dataset "webdataset"; `transforms`
    is (train transform, eval transform), `resize_to` the eval resize's shorter side (the bomb check's);
    `report` gets the counts the start-up lines print."""
    train_paths = expand(data_params["train_shards"], "data.train_shards")
    classes, train_counts = read_index(train_paths, "data.train_shards")
    val_paths = expand(data_params["val_shards"], "data.val_shards") if data_params["val_shards"] else []
    val_classes, val_counts = read_index(val_paths, "data.val_shards") if val_paths else (classes, [])
    if val_classes != classes:
        raise UserError("the classes of data.val_shards differ from those of data.train_shards; write both from one source.")
    if data_params["train_samples"] is not None and data_params["train_samples"] > sum(train_counts):
        warnings.warn(f"data.train_samples {data_params['train_samples']} is more than data.train_shards hold "
                      f"({sum(train_counts)}); an epoch is every sample once", stacklevel=2)
    report.update(train_files=sum(train_counts), val_files=sum(val_counts), skipped_at_scan=0, skipped_files=[])
    workers = data_params["workers"]

    def make(paths, counts, train, samples=None):
        stream = ShardStream(paths, counts, classes, transforms[0] if train else transforms[1],
                             channels=data_params["channels"], resize_to=resize_to, batch_size=batch_size, seed=seed,
                             rank=rank, world_size=world_size, train=train, workers=workers,
                             buffer=data_params["shuffle_buffer"])
        return ShardLoader(stream, samples, device=device, workers=workers, report=report)

    train = make(train_paths, train_counts, True, min(data_params["train_samples"] or sum(train_counts), sum(train_counts)))
    return train, make(val_paths, val_counts, False) if val_paths else None, classes
