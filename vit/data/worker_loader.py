"""A torch DataLoader for what does not fit in memory: workers decode files, bad files are dropped.

Reproducibility does not depend on the number of workers: the batch sampler hands each sample its
own seed (drawn from (seed, epoch, rank)), and the dataset seeds torch/random/numpy with it around
the transform. The DataLoader draws its workers' base seed from a generator of its own, never from the
global torch stream: with persistent workers it draws once per process, so a resumed process would
otherwise shift dropout and drop path from its first epoch on. A file that fails to decode becomes a short message instead of a tensor; the collate
drops it and the loader counts it in `.skipped`, so a corrupt file never stops an epoch.
"""

import logging
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vit.data.folder import record_dropped
from vit.data.images import BadImage, open_image
from vit.data.sampler import epoch_generator, num_batches, shard_indices, shard_size


logger = logging.getLogger(__name__)  # a dropped file's notice, once per file


class FileSource:
    """Sample i -> PIL image decoded from paths[i]; `resize_to` is the eval resize's shorter side (see open_image)."""

    def __init__(self, paths, channels, resize_to=None):
        self.paths, self.channels, self.resize_to = list(paths), channels, resize_to

    def __len__(self):
        return len(self.paths)

    def __call__(self, i):
        return open_image(self.paths[i], self.channels, resize_to=self.resize_to)


class ArraySource:
    """Sample i -> PIL image from a uint8 array (N, H, W) (Fashion-MNIST with RandAugment)."""

    def __init__(self, images, channels):
        self.images, self.mode = images, "L" if channels == 1 else "RGB"

    def __len__(self):
        return len(self.images)

    def __call__(self, i):
        return Image.fromarray(np.ascontiguousarray(self.images[i]), "L").convert(self.mode)


class SampleDataset(Dataset):
    """(index, seed) -> (tensor (C, S, S), label), or the BadImage message for a broken file."""

    def __init__(self, source, labels, transform):
        self.source, self.labels, self.transform = source, list(labels), transform

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        i, seed = key
        try:
            image = self.source(i)
        except BadImage as e:
            return str(e)
        with seeded(seed):
            return self.transform(image), self.labels[i]


class seeded:
    """Seed torch, random and numpy for one sample and restore them after (workers=0 runs in the trainer)."""

    def __init__(self, seed):
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(self.seed)  # the CPU stream only: torch.manual_seed would reseed the GPU's too
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc):
        torch.set_rng_state(self.state[0])
        random.setstate(self.state[1])
        np.random.set_state(self.state[2])


class EpochBatchSampler:
    """Batches of (index, seed) for this rank; shard and order as in data.sampler."""

    def __init__(self, n, batch_size, *, seed, rank, world_size, shuffle, drop_last):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.shuffle, self.drop_last = rank, world_size, shuffle, drop_last
        self.epoch = 0

    def __len__(self):
        return num_batches(shard_size(self.n, self.rank, self.world_size, self.shuffle), self.batch_size, self.drop_last)

    def __iter__(self):
        idx = shard_indices(self.n, self.seed, self.epoch, self.rank, self.world_size, self.shuffle).tolist()
        g = epoch_generator(self.seed, self.epoch, stream=1 + self.rank)
        seeds = torch.randint(0, 2**62, (len(idx),), generator=g).tolist()
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield list(zip(idx[sl], seeds[sl]))


def split_bad(batch):
    """Samples -> (the good (x, y) pairs, the messages of the bad ones)."""
    return [s for s in batch if not isinstance(s, str)], [s for s in batch if isinstance(s, str)]


def collate_drop_bad(batch):
    """-> ((x stacked, y), messages of the bad samples); the batch part is None if none was good."""
    good, bad = split_bad(batch)
    if not good:
        return None, bad
    return (torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good])), bad


def _worker_init(worker_id):
    # each worker decodes one image at a time: more intra-op threads would only oversubscribe the cores
    torch.set_num_threads(1)


class WorkerLoader:
    """Iterable of (x, y) on `device`; `.skipped` counts files dropped this epoch, `report` each file once.

    collate_fn runs in the workers and gives (batch or None, bad messages); `finish` runs in the trainer
    and turns a collated batch into (x, y, more bad messages) on the device (data.device_decode decodes there).
    """

    def __init__(self, dataset, batch_sampler, *, device, workers, report, collate_fn=collate_drop_bad, finish=None):
        self.batch_sampler, self.device, self.report = batch_sampler, torch.device(device), report
        self.finish = finish or self._to_device
        self.skipped = 0
        self.dropped = set()  # messages (they name the file) already reported: every pass meets them again
        self.loader = DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init,
            prefetch_factor=4 if workers > 0 else None, persistent_workers=workers > 0,
            generator=torch.Generator(),  # unused by our per-sample seeds; it keeps the global stream untouched
        )

    def set_epoch(self, epoch):
        """Shuffle and augmentation of the next iteration become a pure function of (seed, epoch)."""
        self.batch_sampler.epoch = epoch

    @property
    def samples(self):
        """Files (or arrays) this loader draws from (all ranks together)."""
        return self.batch_sampler.n

    def __len__(self):
        return len(self.batch_sampler)

    def in_order(self):
        """Every sample once, in index order (all ranks' samples, no drop_last), with this loader's
        transform and workers; broken files are dropped, and warned about once, as in an epoch. What a
        feature cache is extracted from."""
        s = self.batch_sampler
        sampler = EpochBatchSampler(s.n, s.batch_size, seed=s.seed, rank=0, world_size=1, shuffle=False, drop_last=False)
        sampler.epoch = s.epoch
        loader = type(self)(self.loader.dataset, sampler, device=self.device, workers=self.loader.num_workers,
                            report=self.report, collate_fn=self.loader.collate_fn, finish=self.finish)
        loader.dropped = self.dropped
        return iter(loader)

    def __iter__(self):
        self.skipped = 0
        for x, y, bad in self._finished():
            for message in bad:
                if message in self.dropped:
                    continue
                self.dropped.add(message)
                logger.warning("skipped an image that failed to decode: %s", message)
                record_dropped(self.report, [message])
            self.skipped += len(bad)
            if x is None:  # a whole batch of broken files: nothing to train on
                continue
            yield x, y

    def _finished(self):
        """(x, y, bad) per batch, x and y on the device (None when nothing in the batch was good)."""
        for batch, bad in self.loader:
            x, y, late = self.finish(batch) if batch is not None else (None, None, [])
            yield x, y, bad + late

    def _to_device(self, batch):
        x, y = batch
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), []
