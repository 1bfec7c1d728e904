"""Data for training and evaluation: `build_loaders(...)` gives train/val iterables, classes and a report.

Which loader serves a dataset:
- TensorLoader (decoded uint8 on the training device, batched crop/flip there): Fashion-MNIST and
  folders with data.in_memory true, or "auto" (Fashion-MNIST always fits; a folder fits when train+val
  decoded at the eval resize size take less than IN_MEMORY_LIMIT bytes);
- WorkerLoader (DataLoader workers decode files): everything else, and any dataset when
  train.randaugment is set (RandAugment runs on PIL images, one at a time);
- DeviceDecodeLoader (workers read bytes, the batch is decoded and augmented on the device): folders
  that stay on disk when data.decode is "device";
- ShardLoader (webdataset streams tar shards, split by rank and worker): data.dataset "webdataset".
train.batch_size is per rank (the DeiT convention): a DDP run sees world_size * batch_size per step.

The sections come validated and complete (vit/params.py fills in every default), so each key
is read as it is; nothing here restates a default. This package imports nothing of the project but
vit.errors.
"""

import logging
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from vit.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from vit.data.fashion_mnist import load_fashion_mnist
from vit.data.device_decode import CropPlan, DeviceDecodeLoader, DeviceDecoder, EncodedSource, collate_encoded
from vit.data.folder import class_folders, decode_all, record_dropped, scan_folder
from vit.data.tensor_loader import TensorLoader
from vit.data.transforms import eval_transform, resize_size, train_transform
from vit.data.worker_loader import ArraySource, EpochBatchSampler, FileSource, SampleDataset, WorkerLoader
from vit.errors import UserError

logger = logging.getLogger(__name__)  # the skipped files' notices: one line each, printed by the command line
IN_MEMORY_LIMIT = 2 * 1024**3  # bytes of decoded uint8 images for in_memory "auto"


@dataclass
class Loaders:
    """What training needs from the data: the two loaders, class names, normalization and a report."""
    train: object
    val: Optional[object]  # None when a val_split leaves no class a validation file
    classes: list
    mean: list
    std: list
    report: dict


def class_names(data_params: dict) -> list:
    """The class names of params.json's data section, from the folder names or the shards' index alone
    (no image is read): the model's head is built from them before the data is decoded."""
    if data_params["dataset"] == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if data_params["dataset"] == "webdataset":  # shards.json beside the shards names them
        from vit.data.shards import expand, read_index  # webdataset is imported by the runs that stream shards alone
        return read_index(expand(data_params["train_shards"], "data.train_shards"), "data.train_shards")[0]
    return class_folders(data_params["train_dir"], "data.train_dir")


def build_loaders(data_params: dict, train_params: dict, device: Union[str, torch.device], rank: int = 0,
                  world_size: int = 1) -> Loaders:
    """params.json's data section (+ train batch_size/seed/augmentation, both whole and validated) ->
    Loaders for this rank."""
    device = torch.device(device)
    channels, image_size = data_params["channels"], data_params["image_size"]
    mean, std = [float(m) for m in data_params["mean"]], [float(s) for s in data_params["std"]]
    if not len(mean) == len(std) == channels:
        raise UserError(f"data.mean {mean} and data.std {std} need one value per channel (data.channels={channels}).")
    in_memory, randaugment = data_params["in_memory"], train_params["randaugment"]
    if in_memory is True and randaugment:
        raise UserError("train.randaugment needs the worker loader; set data.in_memory to \"auto\" or false, "
                        "or train.randaugment to null.")
    report = {"dropped_at_load": 0, "dropped_files": []}
    dataset, decode = data_params["dataset"], data_params["decode"]
    if dataset == "webdataset":  # streamed: never in memory, decoded by the workers
        aug = dict(scale=train_params["random_resized_crop_scale"], hflip=train_params["hflip"], randaugment=randaugment)
        transforms = (train_transform(image_size, channels, mean, std, **aug), eval_transform(image_size, channels, mean, std))
        from vit.data.shards import loaders_from_shards
        train, val, classes = loaders_from_shards(data_params, train_params["batch_size"], train_params["seed"], rank,
                                                  world_size, transforms, resize_size(image_size), device, report)
        report["loader"] = "webdataset"
        _check_batches(train, train_params["batch_size"], report, world_size)
        return Loaders(train, val, classes, mean, std, report)
    if decode == "device" and (dataset != "folder" or randaugment):
        raise UserError("data.decode \"device\" decodes JPEG folders on the training device without PIL; it needs "
                        "data.dataset \"folder\" and train.randaugment null (set data.decode to \"workers\").")
    if decode == "device" and device.type == "mps":
        raise UserError("data.decode \"device\" decodes JPEGs with nvjpeg on a CUDA GPU (or libjpeg on the CPU), and torch "
                        "has no JPEG decoder on MPS; set data.decode to \"workers\".")
    if dataset == "fashion_mnist":
        classes = list(FASHION_MNIST_CLASSES)
        train_set, val_set = load_fashion_mnist("train"), load_fashion_mnist("val")
        report.update(train_files=len(train_set[0]), val_files=len(val_set[0]), skipped_at_scan=0, skipped_files=[])
        use_tensor = in_memory is not False and not randaugment  # 55 MB: always fits
    elif dataset == "folder":
        split = scan_folder(data_params["train_dir"], data_params["val_dir"], val_split=data_params["val_split"],
                            split_seed=data_params["split_seed"], threads=max(4, data_params["workers"]))
        classes, train_set, val_set = split.classes, split.train, split.val
        report.update(split.report)
        decoded_bytes = (len(train_set) + len(val_set)) * channels * resize_size(image_size) ** 2
        use_tensor = in_memory is True or (in_memory == "auto" and not randaugment and decoded_bytes < IN_MEMORY_LIMIT)
    else:
        raise UserError(f"data.dataset {dataset!r} is not one of \"fashion_mnist\", \"folder\", \"webdataset\".")
    report["loader"] = "tensor" if use_tensor else "device-decode" if decode == "device" else "workers"

    common = dict(batch_size=train_params["batch_size"], seed=train_params["seed"], rank=rank, world_size=world_size)
    aug = dict(scale=train_params["random_resized_crop_scale"], hflip=train_params["hflip"])
    if use_tensor:
        make = _tensor_loader_factory(dataset, data_params, device, report, common)
    elif decode == "device":
        make = _device_decode_factory(data_params, device, report, common)
    else:
        make = _worker_loader_factory(dataset, data_params, device, report, common, randaugment)
    train = make(train_set, train=True, **aug)
    val = make(val_set, train=False, **aug) if report["val_files"] else None  # aug unused when train=False
    _check_batches(train, common["batch_size"], report, world_size)
    return Loaders(train, val, classes, mean, std, report)


def _check_batches(train, batch_size, report, world_size):
    if len(train) == 0:
        raise UserError(f"train.batch_size {batch_size} is more than the training images per rank "
                        f"({report['train_files']} images over {world_size} rank(s)); lower train.batch_size.")


def _tensor_loader_factory(dataset, data_params, device, report, common):
    """-> make(samples, train, **aug) building a TensorLoader from decoded uint8 on `device`."""
    channels, image_size = data_params["channels"], data_params["image_size"]
    kw = dict(image_size=image_size, mean=data_params["mean"], std=data_params["std"], **common)

    def make(samples, train, **aug):
        if dataset == "fashion_mnist":  # (N, 28, 28) stored whole; RGB repeats the gray channel
            x, y = samples
            x = torch.from_numpy(np.array(x))[:, None].expand(-1, channels, -1, -1)
        else:  # decoded once at the eval framing; files that fail are dropped and counted
            x, y, failed = decode_all(samples, channels, resize_size(image_size), max(4, data_params["workers"]))
            if failed:
                logger.warning("skipped %d image(s) that failed to decode: %s", len(failed), "; ".join(failed[:5]))
            record_dropped(report, failed)
            x = torch.from_numpy(x)
        return TensorLoader(x.contiguous().to(device), torch.from_numpy(np.array(y)), train=train, **aug, **kw)
    return make


def _worker_loader_factory(dataset, data_params, device, report, common, randaugment):
    """-> make(samples, train, **aug) building a WorkerLoader over files or Fashion-MNIST arrays."""
    channels, image_size = data_params["channels"], data_params["image_size"]
    mean, std = data_params["mean"], data_params["std"]

    def make(samples, train, **aug):
        if dataset == "fashion_mnist":
            source, labels = ArraySource(samples[0], channels), samples[1]
        else:
            source, labels = FileSource([p for p, _ in samples], channels, resize_size(image_size)), [y for _, y in samples]
        if train:
            transform = train_transform(image_size, channels, mean, std, randaugment=randaugment, **aug)
        else:
            transform = eval_transform(image_size, channels, mean, std)
        sampler = EpochBatchSampler(len(source), shuffle=train, drop_last=train, **common)
        return WorkerLoader(SampleDataset(source, labels, transform), sampler, device=device,
                            workers=data_params["workers"], report=report)
    return make


def _device_decode_factory(data_params, device, report, common):
    """-> make(samples, train, **aug) building a DeviceDecodeLoader over a folder's files."""
    decoder = DeviceDecoder(data_params["image_size"], data_params["channels"], data_params["mean"], data_params["std"], device)

    def make(samples, train, **aug):
        source = EncodedSource([p for p, _ in samples], data_params["channels"], resize_size(data_params["image_size"]))
        plan = CropPlan(data_params["image_size"], train, **aug)
        sampler = EpochBatchSampler(len(source), shuffle=train, drop_last=train, **common)
        return DeviceDecodeLoader(SampleDataset(source, [y for _, y in samples], plan), sampler, device=device,
                                  workers=data_params["workers"], report=report,
                                  collate_fn=collate_encoded, finish=decoder)
    return make


def denormalize(x: torch.Tensor, mean: list, std: list) -> torch.Tensor:
    """Normalized float (B, C, H, W) -> uint8 (B, H, W, C) on the CPU, for image grids."""
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()
