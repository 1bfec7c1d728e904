"""Every bad or unusual image kind of issue 5, through open_image and through the folder policy."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vit.data import build_loaders
from vit.data.folder import scan_folder
from vit.data.images import BadImage, check_header, open_image
from helpers import logged, section
from vit.errors import UserError


def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width, height):
    """A valid-looking PNG whose header declares width x height; only a few bytes of data exist."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b""))


def encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w=48, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def exif_rotated_jpeg():
    """40 wide x 20 tall: red left half, blue right half, EXIF orientation 6 (display rotated 90 CW)."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(Image.fromarray(a), "JPEG", quality=95, exif=exif)


# files a scan must skip (cheap header check), files only a full decode can catch
SCAN_BAD = {
    "random.jpg": np.random.default_rng(1).bytes(3000),
    "zero.png": b"",
    "text.jpg": b"this is not an image, just text saved with the wrong name\n" * 20,
    "bomb.png": bomb_png(30000, 30000),  # 900 M pixels: PIL's DecompressionBombError
    "bomb_warn.png": bomb_png(10000, 10000),  # 100 M pixels: only a PIL warning, refused by our limit
    "notes.txt": b"annotation file left in a class folder",
}
LOAD_BAD = {
    "truncated.jpg": encoded(noise(), "JPEG")[:-400],  # header intact, scan data cut short
    "truncated.png": encoded(noise(), "PNG")[:-400],
}


def odd_but_good():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.paste(0, (0, 0, 16, 8))  # top half index 0 = transparent
    return {
        "cmyk.jpg": encoded(Image.new("CMYK", (24, 16), (0, 0, 0, 0)), "JPEG", quality=95),
        "gray16.png": encoded(Image.fromarray(np.full((16, 16), 65535, np.uint16)), "PNG"),
        "palette.png": encoded(pal, "PNG", transparency=0),
        "rgba.png": encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
        "rotated.jpg": exif_rotated_jpeg(),
        "gray.png": encoded(Image.new("L", (20, 20), 90), "PNG"),
    }


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(SCAN_BAD) + sorted(LOAD_BAD))
def test_bad_files_raise_badimage(tmp_path, name):
    path = tmp_path / name
    path.write_bytes({**SCAN_BAD, **LOAD_BAD}[name])
    with pytest.raises(BadImage, match=name):
        open_image(path, 3)
    if name in LOAD_BAD:  # header is fine: only decoding finds the damage
        assert check_header(path)
    elif name != "notes.txt":
        with pytest.raises(BadImage):
            check_header(path)


def test_odd_modes_decode(tmp_path):
    write(tmp_path, odd_but_good())
    cmyk = np.asarray(open_image(tmp_path / "cmyk.jpg", 3))
    assert cmyk.shape == (16, 24, 3) and cmyk.min() >= 250, "CMYK (0,0,0,0) is white"
    gray16 = open_image(tmp_path / "gray16.png", 1)
    assert Image.open(tmp_path / "gray16.png").mode in ("I;16", "I")
    assert gray16.mode == "L" and np.asarray(gray16).min() == 255, "65535 must scale to 255, not clip"
    pal = np.asarray(open_image(tmp_path / "palette.png", 3))
    assert (pal[:8] == 255).all(), "transparent palette pixels composite on white"
    assert (pal[8:] == (10, 200, 30)).all()
    rgba = np.asarray(open_image(tmp_path / "rgba.png", 3))
    assert (rgba[8:] == 255).all() and (rgba[:8] == (200, 0, 0)).all()
    gray_rgb = np.asarray(open_image(tmp_path / "gray.png", 3))
    assert gray_rgb.shape == (20, 20, 3) and (gray_rgb == 90).all()
    assert open_image(tmp_path / "rgba.png", 1).mode == "L"


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_rotated_jpeg())
    a = np.asarray(open_image(path, 3)).astype(int)
    assert a.shape == (40, 20, 3), "orientation 6 swaps width and height"
    top, bottom = a[5, 10], a[35, 10]  # rotated 90 CW: the red left half ends on top
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def _folder_params(tmp_path, **kw):
    return section("data", **{"dataset": "folder", "train_dir": str(tmp_path / "train"), "val_dir": None, "val_split": 0.0,
                              "split_seed": 0, "image_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                              "workers": 0, **kw})


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("in_memory,decode", [(False, "workers"), (True, "workers"), (False, "device")])
def test_folder_policy_counts_every_kind(tmp_path, in_memory, decode, caplog, recwarn):
    write(tmp_path / "train" / "a", {**SCAN_BAD, **LOAD_BAD, **odd_but_good()})
    write(tmp_path / "train" / "b", {f"{i}.png": encoded(noise(seed=i), "PNG") for i in range(3)})
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored, not counted
    n_good, n_files = 6 + 3, 6 + 3 + len(LOAD_BAD)
    loaders = build_loaders(_folder_params(tmp_path, in_memory=in_memory, decode=decode),
                            section("train", batch_size=n_good if in_memory else n_files, seed=0), "cpu")
    report, messages = loaders.report, logged(caplog).splitlines()  # notices on the `vit` logger, one line each
    assert any(m.startswith(f"skipped {len(SCAN_BAD)} file(s) that are not usable") for m in messages), messages
    assert in_memory == any(m.startswith(f"skipped {len(LOAD_BAD)} image(s) that failed to decode") for m in messages)
    assert report["skipped_at_scan"] == len(SCAN_BAD)
    assert sorted(m.split(":")[0].rsplit("/", 1)[1] for m in report["skipped_files"]) == sorted(SCAN_BAD)
    assert report["train_files"] == n_files and loaders.val is None
    assert report["loader"] == {(True, "workers"): "tensor", (False, "workers"): "workers",
                                (False, "device"): "device-decode"}[in_memory, decode]
    if in_memory:  # decoded up front: the two truncated files are dropped at build time
        assert report["dropped_at_load"] == len(LOAD_BAD)
        assert len(loaders.train.images) == n_good
    else:  # dropped by the collate mid-epoch, never raised
        (x, y), = list(loaders.train)
        assert "failed to decode" in logged(caplog)
        assert x.shape == (n_good, 3, 16, 16) and torch_isfinite(x)
        assert loaders.train.skipped == len(LOAD_BAD) == report["dropped_at_load"]
        assert sorted(m.split(":")[0].rsplit("/", 1)[1] for m in report["dropped_files"]) == sorted(LOAD_BAD)


    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], "a Python warning, not a notice"


def torch_isfinite(x):
    return bool(x.isfinite().all())


def test_empty_class_folder_refused_by_name(tmp_path):
    write(tmp_path / "train" / "cat", {"0.png": encoded(noise(), "PNG")})
    (tmp_path / "train" / "dog").mkdir()
    write(tmp_path / "train" / "fish", {"zero.png": b""})  # only unusable files: empty as well
    with pytest.raises(UserError, match=r"train/dog, .*train/fish have no usable images"):
        scan_folder(tmp_path / "train")


def test_val_classes_must_match(tmp_path):
    for split, classes in (("train", "ab"), ("val", "ac")):
        for c in classes:
            write(tmp_path / split / c, {"0.png": encoded(noise(), "PNG")})
    with pytest.raises(UserError, match=r"missing \['b'\], extra \['c'\]"):
        scan_folder(tmp_path / "train", tmp_path / "val")


def test_missing_train_dir_refused(tmp_path):
    with pytest.raises(UserError, match="is not a folder"):
        scan_folder(tmp_path / "nope")
