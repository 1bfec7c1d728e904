"""data.decode "device": bytes from the workers, decode and augmentation on the device (here the CPU,
which runs the same code with libjpeg-turbo instead of nvjpeg). It must give what the PIL worker
loader gives: the same crop and flip per sample, pixels within one uint8 level, the same orientation,
and the same bad-file policy."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from vit.data import build_loaders
from vit.data.device_decode import DeviceDecoder, EncodedSource
from vit.data.images import open_image
from helpers import logged, section
from vit.errors import UserError

LEVEL = 1 / 255 / 0.25  # one uint8 level after normalizing with std 0.25


def jpeg(a, **kw):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def smooth(h, w, seed, gray=False):
    """A smooth random image: resampling differences stay sub-level, so a wrong crop shows at once."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4) if gray else (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def make_folder(root, n=5):
    """Two classes of non-square JPEGs of varied sizes, plus one grayscale JPEG, one PNG and one EXIF-rotated."""
    for c, label in enumerate("ab"):
        d = root / label
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{i}.jpg").write_bytes(jpeg(smooth(30 + 7 * i, 52 - 5 * i, seed=10 * c + i)))
        (d / "gray.jpg").write_bytes(jpeg(smooth(33, 41, seed=50 + c, gray=True)))
        Image.fromarray(smooth(36, 28, seed=60 + c)).save(d / "plain.png")
        exif = Image.Exif()
        exif[0x0112] = 6
        (d / "rotated.jpg").write_bytes(jpeg(smooth(24, 44, seed=70 + c), exif=exif))


def params(root, decode, channels=3, workers=0, **kw):
    return section("data", **{"dataset": "folder", "train_dir": str(root), "val_dir": None, "val_split": 0.3,
                              "split_seed": 0, "image_size": 16, "channels": channels, "mean": [0.5] * channels,
                              "std": [0.25] * channels, "workers": workers, "in_memory": False, "decode": decode, **kw})


def batches(root, decode, split, channels=3, workers=0):
    loaders = build_loaders(params(root, decode, channels, workers), section("train", batch_size=4, seed=3), "cpu")
    assert loaders.report["loader"] == {"workers": "workers", "device": "device-decode"}[decode]
    return list(getattr(loaders, split))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("split", ["train", "val"])
def test_same_batches_as_the_pil_worker_loader(tmp_path, channels, split):
    make_folder(tmp_path)
    ours, pil = batches(tmp_path, "device", split, channels), batches(tmp_path, "workers", split, channels)
    assert len(ours) == len(pil) > 0
    for (x, y), (x_pil, y_pil) in zip(ours, pil):
        assert torch.equal(y, y_pil)
        assert x.shape == x_pil.shape == (len(y), channels, 16, 16) and x.dtype == torch.float32
        # same crop box and flip from the same seed: pixels agree to rounding. Gray adds one rounding:
        # libjpeg outputs the stored luma, PIL rounds RGB first and then converts with its luma rule
        diff = (x - x_pil).abs() / LEVEL
        assert diff.max() <= (1 if channels == 3 else 2) + 1e-3 and diff.mean() < 0.35, (diff.max(), diff.mean())


def test_worker_processes_hand_over_the_bytes(tmp_path):
    make_folder(tmp_path, n=3)
    in_process, spawned = batches(tmp_path, "device", "train"), batches(tmp_path, "device", "train", workers=2)
    assert len(in_process) == len(spawned) > 0
    for (x, y), (x2, y2) in zip(in_process, spawned):
        assert torch.equal(x, x2) and torch.equal(y, y2), "the augmentation must not depend on the workers"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    a = np.zeros((12, 20, 3), np.uint8)  # asymmetric: a bright corner block and a stripe
    a[:4, :6] = 255
    a[:, 15] = (0, 200, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(jpeg(a, exif=exif))
    e = EncodedSource([path], 3)(0)
    assert e.data is not None and e.orientation == orientation
    (image,), bad = DeviceDecoder(16, 3, [0.5] * 3, [0.25] * 3, "cpu").decode([e])
    want = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    assert not bad and image.shape[1:] == want.shape[:2] == e.size
    assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - want.astype(int)).max() <= 1


def test_files_nvjpeg_does_not_take_go_through_pil(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (24, 16), (0, 0, 0, 0)).save(cmyk, "JPEG", quality=95)
    png = tmp_path / "p.png"
    Image.fromarray(smooth(10, 14, seed=1)).save(png)
    source = EncodedSource([cmyk, png], 3)
    for i, path in enumerate((cmyk, png)):
        e = source(i)
        assert e.data is None
        assert torch.equal(e.pixels, torch.from_numpy(np.array(open_image(path, 3))).permute(2, 0, 1))


def test_a_corrupt_file_is_dropped_by_name_and_the_rest_of_the_batch_kept(tmp_path, caplog):
    make_folder(tmp_path, n=3)
    noisy = jpeg(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    (tmp_path / "a" / "cut.jpg").write_bytes(noisy[:-400])  # header intact: passes the scan
    n = build_loaders(params(tmp_path, "device"), section("train", batch_size=1, seed=0), "cpu").report["train_files"]
    loaders = build_loaders(params(tmp_path, "device"), section("train", batch_size=n, seed=0), "cpu")  # one batch: all
    (x, y), = list(loaders.train)
    assert "cut.jpg" in logged(caplog)  # a notice on the `vit` logger, not a Python warning
    assert loaders.train.skipped == 1 and loaders.report["dropped_at_load"] == 1
    assert len(y) == loaders.report["train_files"] - 1 and bool(x.isfinite().all())
    assert "cut.jpg" in loaders.report["dropped_files"][0]


@pytest.mark.parametrize("workers", [0, 2])  # inline, and the background thread over worker processes
def test_stopping_early_and_iterating_again(tmp_path, workers):
    make_folder(tmp_path)
    loaders = build_loaders(params(tmp_path, "device", workers=workers), section("train", batch_size=2, seed=0), "cpu")
    first = next(iter(loaders.train))  # a loop that stops after one batch (NaN stop, Ctrl-C)
    again = list(loaders.train)
    assert len(again) == len(loaders.train) and torch.equal(again[0][0], first[0])


@pytest.mark.parametrize("change", [{"dataset": "fashion_mnist"}, {"randaugment": "rand-m9-mstd0.5"}])
def test_refused_where_it_cannot_apply(tmp_path, change):
    data = {**params(tmp_path, "device"), **{k: v for k, v in change.items() if k == "dataset"}}
    train = section("train", batch_size=2, seed=0, **{k: v for k, v in change.items() if k == "randaugment"})
    with pytest.raises(UserError, match=r'data.decode "device".*set data.decode to "workers"'):
        build_loaders(data, train, "cpu")
