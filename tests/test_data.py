"""Loaders: Fashion-MNIST reader, folder split, per-(seed, epoch) determinism, DDP shards, tensor crops."""

import numpy as np
import pytest
import torch
from PIL import Image

from vit.data import build_loaders, denormalize
from vit.data.fashion_mnist import CLASSES, load_fashion_mnist
from vit.data.folder import scan_folder
from vit.data.images import open_image
from vit.data.tensor_loader import TensorLoader
from vit.data.transforms import eval_transform
from vit.data.worker_loader import EpochBatchSampler
from helpers import section
from vit.errors import UserError

FMNIST = section("data", dataset="fashion_mnist", image_size=28, channels=1, mean=[0.286], std=[0.353],
                 in_memory="auto", workers=0)
TRAIN = section("train", batch_size=64, seed=0, randaugment=None, random_resized_crop_scale=[0.35, 1.0], hflip=0.5)


def make_folder(root, classes=("ant", "bee", "cow"), per_class=6, size=(20, 14)):
    """Tiny RGB images; each class has its own colour so labels can be checked from pixels."""
    for y, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        rng = np.random.default_rng(y)
        for i in range(per_class):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


def folder_params(root, **kw):
    return section("data", **{"dataset": "folder", "train_dir": str(root), "val_dir": None, "val_split": 0.25,
                              "split_seed": 0, "image_size": 16, "channels": 3, "mean": [0.5, 0.4, 0.3],
                              "std": [0.2, 0.25, 0.3], "workers": 0, **kw})


def batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


# ---- Fashion-MNIST ----

def test_fashion_mnist_reader():
    (xt, yt), (xv, yv) = load_fashion_mnist("train"), load_fashion_mnist("val")
    assert xt.shape == (60000, 28, 28) and xv.shape == (10000, 28, 28) and xt.dtype == np.uint8
    assert yt.dtype == np.int64 and np.bincount(yt).tolist() == [6000] * 10 and np.bincount(yv).tolist() == [1000] * 10
    assert CLASSES == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"]
    assert yt[:5].tolist() == [9, 0, 0, 3, 0]  # the first training labels of the official files
    assert 60 < xt.mean() < 80  # mean pixel ~72.9 (0.286 * 255)


def test_fashion_mnist_loaders():
    loaders = build_loaders(FMNIST, TRAIN, "cpu")
    assert loaders.classes == CLASSES and loaders.report["loader"] == "tensor"
    assert len(loaders.train) == 60000 // 64 and len(loaders.val) == -(-10000 // 64)
    x, y = next(iter(loaders.val))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    # the val loader sees whole test images: denormalize gives back the exact uint8 pixels
    xv, yv = load_fashion_mnist("val")
    assert torch.equal(denormalize(x, loaders.mean, loaders.std)[..., 0], torch.from_numpy(xv[:64].copy()))
    assert torch.equal(y, torch.from_numpy(yv[:64].copy()))
    x, y = next(iter(loaders.train))
    assert x.shape == (64, 1, 28, 28) and abs(x.mean().item()) < 0.5


def test_fashion_mnist_rgb_and_bigger_size():
    loaders = build_loaders({**FMNIST, "channels": 3, "image_size": 32, "mean": [0.3] * 3, "std": [0.3] * 3},
                            {**TRAIN, "batch_size": 8}, "cpu")
    x, _ = next(iter(loaders.train))
    assert x.shape == (8, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])


def test_randaugment_uses_worker_loader():
    loaders = build_loaders(FMNIST, {**TRAIN, "batch_size": 4, "randaugment": "rand-m9-mstd0.5"}, "cpu")
    assert loaders.report["loader"] == "workers"
    first = next(iter(loaders.train))
    loaders.train.set_epoch(0)
    again = next(iter(loaders.train))
    assert first[0].shape == (4, 1, 28, 28) and torch.equal(first[0], again[0])
    with pytest.raises(UserError, match="train.randaugment"):
        build_loaders({**FMNIST, "in_memory": True}, {**TRAIN, "randaugment": "rand-m9"}, "cpu")


def test_bad_params_refused():
    with pytest.raises(UserError, match="data.mean"):
        build_loaders({**FMNIST, "mean": [0.5, 0.5]}, TRAIN, "cpu")
    with pytest.raises(UserError, match="train.randaugment 'rand-x9'"):
        build_loaders(FMNIST, {**TRAIN, "randaugment": "rand-x9"}, "cpu")
    with pytest.raises(UserError, match="data.dataset"):
        build_loaders({**FMNIST, "dataset": "cifar"}, TRAIN, "cpu")


# ---- folders ----

def test_split_is_seeded_and_stratified(tmp_path):
    root = make_folder(tmp_path / "train", per_class=8)
    a, b = scan_folder(root, val_split=0.25, split_seed=0), scan_folder(root, val_split=0.25, split_seed=0)
    c = scan_folder(root, val_split=0.25, split_seed=1)
    assert a.train == b.train and a.val == b.val and a.val != c.val
    assert a.classes == ["ant", "bee", "cow"] and len(a.train) == 18 and len(a.val) == 6
    assert sorted(y for _, y in a.val) == [0, 0, 1, 1, 2, 2]  # 2 of 8 per class
    assert not {p for p, _ in a.train} & {p for p, _ in a.val}


@pytest.mark.parametrize("in_memory", [True, False])
def test_folder_set_epoch_determinism(tmp_path, in_memory):
    loaders = build_loaders(folder_params(make_folder(tmp_path / "train"), in_memory=in_memory),
                            {**TRAIN, "batch_size": 4}, "cpu")
    assert loaders.report["loader"] == ("tensor" if in_memory else "workers")
    assert len(loaders.train) == 12 // 4 and len(loaders.val) == 2  # 3 x 6 images: 12 train, 6 val
    e0, e0_again, e1 = batches(loaders.train, 0), batches(loaders.train, 0), batches(loaders.train, 1)
    assert same(e0, e0_again) and not same(e0, e1)
    assert e0[0][0].shape == (4, 3, 16, 16)
    assert same(batches(loaders.val, 0), batches(loaders.val, 5)), "eval is not random"


def test_worker_count_does_not_change_batches(tmp_path):
    root = make_folder(tmp_path / "train")
    runs = []
    for workers in (0, 2):  # two epochs each: persistent workers must follow set_epoch too
        train = build_loaders(folder_params(root, in_memory=False, workers=workers), {**TRAIN, "batch_size": 4},
                              "cpu").train
        runs.append(batches(train, 3) + batches(train, 4))
    assert same(*runs) and not same(runs[0][:3], runs[0][3:])


def test_in_memory_eval_matches_eval_transform(tmp_path):
    """Tensor loader val batches == eval_transform on the files: train/eval framing is one thing."""
    root = make_folder(tmp_path / "train", size=(23, 17))
    params = folder_params(root, in_memory=True, image_size=12)
    loaders = build_loaders(params, {**TRAIN, "batch_size": 6}, "cpu")
    x, y = next(iter(loaders.val))
    split = scan_folder(root, val_split=0.25, split_seed=0)
    tf = eval_transform(12, 3, params["mean"], params["std"])
    ref = torch.stack([tf(open_image(p, 3)) for p, _ in split.val])
    assert x.shape == ref.shape == (6, 3, 12, 12) and y.tolist() == [lbl for _, lbl in split.val]
    assert (x - ref).abs().max() < 1e-4, (x - ref).abs().max()


def test_ddp_shards_disjoint_and_equal(tmp_path):
    n = 103
    for shuffle in (True, False):
        shards = []
        for rank in range(3):
            s = EpochBatchSampler(n, 8, seed=0, rank=rank, world_size=3, shuffle=shuffle, drop_last=shuffle)
            s.epoch = 2
            shards.append([i for batch in s for i, _ in batch])
        flat = [i for s in shards for i in s]
        assert len(flat) == len(set(flat)), "ranks overlap"
        if shuffle:  # training: same batch count on every rank
            assert len({len(s) for s in shards}) == 1 and len(shards[0]) == (n // 3) // 8 * 8
        else:  # eval: every sample exactly once
            assert sorted(flat) == list(range(n))


# ---- tensor loader ----

def tensor_loader(images, **kw):
    args = dict(batch_size=8, image_size=images.shape[-1], mean=[0.0] * images.shape[1],
                std=[1.0] * images.shape[1], train=True, seed=0, scale=(0.35, 1.0), hflip=0.5)
    return TensorLoader(images, torch.arange(len(images)), **{**args, **kw})


def test_tensor_loader_ddp_shards():
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    ranks = [tensor_loader(images, rank=r, world_size=2, batch_size=6) for r in range(2)]
    ids = []
    for loader in ranks:
        loader.set_epoch(4)
        ids.append(torch.cat([y for _, y in loader]).tolist())
    assert len(ranks[0]) == len(ranks[1]) == 25 // 6 and len(ids[0]) == len(ids[1]) == 24
    assert not set(ids[0]) & set(ids[1])


def test_tensor_loader_crop_flip_shapes_ranges_determinism():
    images = torch.randint(0, 256, (32, 3, 20, 20), dtype=torch.uint8)
    loader = tensor_loader(images, image_size=12, scale=(0.2, 1.0))
    e0, e0_again, e1 = batches(loader, 0), batches(loader, 0), batches(loader, 1)
    assert same(e0, e0_again) and not same(e0, e1)
    x = torch.cat([b[0] for b in e0])
    assert x.shape == (32, 3, 12, 12) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.std() > 0.1  # mean 0, std 1: pixels / 255


def test_tensor_loader_whole_image_and_flip_are_exact():
    images = torch.randint(0, 256, (16, 1, 10, 10), dtype=torch.uint8)
    # scale (1, 1): no draw with ratio != 1 fits, so torchvision's fallback crop is the whole image
    kept = torch.cat([x for x, _ in tensor_loader(images, scale=(1.0, 1.0), hflip=0.0)])
    flipped = torch.cat([x for x, _ in tensor_loader(images, scale=(1.0, 1.0), hflip=1.0)])
    order = torch.cat([y for _, y in tensor_loader(images, scale=(1.0, 1.0), hflip=0.0)])
    ref = images[order].float() / 255
    assert torch.allclose(kept, ref, atol=1e-5) and torch.allclose(flipped, ref.flip(-1), atol=1e-5)


def test_tensor_loader_crop_zooms_in():
    """A horizontal ramp: a crop of a fraction of the width spans a smaller range of values."""
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).expand(8, 1, 32, 32).contiguous()
    x = torch.cat([b for b, _ in tensor_loader(ramp, scale=(0.1, 0.1), hflip=0.0)])
    span = x[:, 0, :, -1] - x[:, 0, :, 0]  # (B, H): right edge minus left edge of each crop
    assert (span > 0).all() and (span < 0.6).all()


def test_denormalize_roundtrip():
    u8 = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = (u8.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    out = denormalize(x, mean, std)
    assert out.dtype == torch.uint8 and torch.equal(out, u8.permute(0, 2, 3, 1))
