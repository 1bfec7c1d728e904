"""Images: a training run on a folder that holds every bad and every unusual kind of file finishes,
skips or drops each bad file once with a count, and trains on the unusual good ones.

The per-function checks of open_image live in test_data_images.py; here the whole run is attacked.
"""

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import faults_util as fu
import helpers
from vit.data.images import open_image


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side):
    """A real 1-bit side x side PNG of zeros: a few KB on disk, side^2 pixels once decoded."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(row * side, 9)) + png_chunk(b"IEND", b"")


def encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w=24, h=20, seed=0, boost=0):
    """Noise with one dominant channel, like the generated class images."""
    a = (np.random.default_rng(seed).random((h, w, 3)) * 60).astype(np.uint8)
    a[:, :, boost] += 150
    return Image.fromarray(a)


def exif_rotated(boost):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return encoded(photo(32, 16, boost=boost), "JPEG", quality=95, exif=exif)


def palette_with_transparency(boost):
    im = photo(boost=boost).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(im, "PNG", transparency=0)


def png16(boost):
    a = np.asarray(photo(boost=boost).convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    im = Image.fromarray(a)  # mode I;16
    assert im.mode == "I;16", im.mode
    return encoded(im, "PNG")


# what a scan refuses from the header, and what only a full decode finds (file name -> bytes)
SCAN_BAD = {
    "random.jpg": np.random.default_rng(1).bytes(3000),
    "random.png": np.random.default_rng(2).bytes(500),
    "zero.jpg": b"",
    "text.jpg": b"not an image, only text with an image's name\n" * 10,
    "bomb.png": bomb_png(11000),  # 121 M pixels: over PIL's 89 M limit, under its hard error
    "notes.txt": b"a note left in a class folder",
}
LOAD_BAD = {
    "truncated.jpg": encoded(photo(64, 64, seed=3), "JPEG", quality=95)[:-600],
    "truncated.png": encoded(photo(64, 64, seed=4), "PNG")[:-600],
}
# unusual but good: each must be decoded and trained on (boost = its class's channel)
UNUSUAL = {
    "cmyk.jpg": lambda c: encoded(photo(boost=c).convert("CMYK"), "JPEG"),
    "gray16.png": png16,
    "palette_alpha.png": palette_with_transparency,
    "exif_rotated.jpg": exif_rotated,
    "rgba.png": lambda c: encoded(photo(boost=c).convert("RGBA"), "PNG"),
}


def build_folder(root):
    """3 classes x 16 generated images; bad files spread over the classes; every unusual kind in class_0."""
    classes = fu.make_folder(root)
    bad = {**SCAN_BAD, **LOAD_BAD}
    for i, (name, blob) in enumerate(bad.items()):
        (root / classes[i % 3] / f"bad_{name}").write_bytes(blob)
    for name, make in UNUSUAL.items():
        (root / classes[0] / f"odd_{name}").write_bytes(make(0))
    return classes


def test_unusual_images_decode_to_what_a_person_sees(tmp_path):
    build_folder(tmp_path)
    odd = {name: open_image(tmp_path / "class_0" / f"odd_{name}", 3) for name in UNUSUAL}
    assert odd["exif_rotated.jpg"].size == (16, 32)  # stored 32 wide, shown 16 wide
    for name, im in odd.items():
        a = np.asarray(im, dtype=np.float64)
        assert im.mode == "RGB" and a.mean() > 20, f"{name} decoded to a blank image"
    gray = np.asarray(odd["gray16.png"], dtype=np.float64)
    assert gray.max() > 100, "16-bit values were clipped or scaled to black"


# decoded up front / by PIL in the loader's workers / by the device decoder (bytes from the workers)
@pytest.mark.parametrize("in_memory,decode", [(True, "workers"), (False, "workers"), (False, "device")])
def test_training_on_a_folder_of_bad_and_odd_images_finishes_and_counts(tmp_path, in_memory, decode):
    data_dir = tmp_path / "data"
    build_folder(data_dir)
    params = fu.tiny_params(data_dir, tmp_path / "run", epochs=1)
    params["data"].update(in_memory=in_memory, decode=decode)
    r = fu.run(["--params", fu.write_params(tmp_path / "params.json", params)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    # the scan refuses each header-bad file by name, and the run ends with both counts
    m = re.search(r"bad files: (\d+) skipped at scan, (\d+) dropped at load", r.stdout)
    assert m, r.stdout[-2000:]
    assert int(m.group(1)) == len(SCAN_BAD), r.stdout[-2000:]
    assert int(m.group(2)) == len(LOAD_BAD), f"each truncated file must count once, not once per pass:\n{r.stdout[-2000:]}"
    assert f"skipped {len(SCAN_BAD)} file(s)" in r.stderr, r.stderr[-3000:]
    named = [name for name in SCAN_BAD if f"bad_{name}" in r.stderr]
    assert len(named) >= 5, f"the skip warning names only {named}"  # it lists the first five, then "..."
    lines = fu.read_metrics(tmp_path / "run")
    assert len(lines) == 1 and lines[0]["acc"] >= 0
    fu.record("images", f"bad files tried (in_memory={in_memory}, decode={decode})", len(SCAN_BAD) + len(LOAD_BAD))
    fu.record("images", f"unusual good files trained on (in_memory={in_memory}, decode={decode})", len(UNUSUAL))


def test_the_odd_images_are_trained_on_not_dropped(tmp_path):
    from vit.data import build_loaders

    build_folder(tmp_path)
    params = fu.tiny_params(tmp_path, tmp_path / "run")
    loaders = build_loaders(helpers.section("data", **params["data"], in_memory=True),
                            helpers.section("train", **params["train"], seed=0), "cpu")
    good = 3 * 16 + len(UNUSUAL)
    report = loaders.report
    assert report["train_files"] + report["val_files"] == good + len(LOAD_BAD)  # truncated pass the header scan
    assert report["dropped_at_load"] == len(LOAD_BAD)
    assert not any("/odd_" in f for f in report["skipped_files"] + report["dropped_files"])
    assert len(loaders.train.images) + len(loaders.val.images) == good
