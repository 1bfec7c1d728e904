"""Images: a training run on a folder that holds every bad and every unusual kind of file finishes,
skips or drops each bad file once with a count, and trains on the unusual good ones.

The per-function checks of open_image live in test_data_images.py; here the whole run is attacked.
"""

import io
import os
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
    assert f"skipped {len(SCAN_BAD)} file(s)" in r.stdout and "Warning" not in r.stderr, r.stderr[-3000:]  # a notice, no source line
    named = [name for name in SCAN_BAD if f"bad_{name}" in r.stdout]
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


# -----------------------------------------------------------------------------
# thin images: a few KB on disk, under PIL's pixel limit, and gigabytes once the shorter side is resized


def thin(w, h, fmt="PNG"):
    return encoded(Image.new("L", (w, h), 200), fmt)


THIN = {  # under the 89 M pixel limit, all of them
    "strip_2000000x1.png": lambda: thin(2_000_000, 1),
    "strip_1x2000000.png": lambda: thin(1, 2_000_000),
    "strip_65000x3.jpg": lambda: thin(65_000, 3, "JPEG"),
    "strip_5000x40.png": lambda: thin(5000, 40),  # 125:1, just past the 100:1 bound
}


def write_thin(folder):
    paths = []
    for name, make in THIN.items():
        (folder / name).write_bytes(make())
        paths.append(folder / name)
    return paths


def test_thin_images_are_refused_from_the_header_by_every_reader(tmp_path):
    import resource

    from vit.data.device_decode import EncodedSource
    from vit.data.folder import decode_all
    from vit.data.images import BadImage, check_header
    from vit.data.worker_loader import FileSource

    paths = write_thin(tmp_path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in paths:
        readers = {"scan": lambda: check_header(path), "open_image": lambda: open_image(path, 3, resize_to=18),
                   "workers": lambda: FileSource([path], 3, 18)(0), "device decode": lambda: EncodedSource([path], 3, 18)(0)}
        for reader, read in readers.items():
            with pytest.raises(BadImage, match="longer than 100 times"):
                read()
        images, labels, failed = decode_all([(path, 0)], 3, 18, threads=1)  # the tensor loader's decode-all
        assert len(images) == 0 and len(failed) == 1 and "longer than 100 times" in failed[0]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < 200, f"peak memory grew by {grown:.0f} MB while refusing thin images"
    # 90:1 passes the ratio, but its shorter side resized to 2000 would make 2000 x 180,000 pixels
    (tmp_path / "wide.png").write_bytes(thin(9000, 100))
    assert open_image(tmp_path / "wide.png", 1, resize_to=18).size == (9000, 100)
    with pytest.raises(BadImage, match="resized to a shorter side of 2000"):
        open_image(tmp_path / "wide.png", 1, resize_to=2000)
    fu.record("thin", "thin images refused by the scan, open_image, the workers, device decode and decode-all", len(THIN) * 5 + 1)


@pytest.mark.parametrize("in_memory,decode", [(True, "workers"), (False, "workers"), (False, "device")])
def test_training_with_thin_images_in_train_and_val_finishes(tmp_path, in_memory, decode):
    fu.make_folder(tmp_path / "train")
    fu.make_folder(tmp_path / "val", per_class=4)
    write_thin(tmp_path / "train" / "class_0")
    write_thin(tmp_path / "val" / "class_1")
    params = fu.tiny_params(tmp_path / "train", tmp_path / "run", epochs=1)
    params["data"].update(val_dir=str(tmp_path / "val"), in_memory=in_memory, decode=decode)
    r = fu.run(["--params", fu.write_params(tmp_path / "params.json", params)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    fu.assert_bounded(r)
    assert f"bad files: {2 * len(THIN)} skipped at scan" in r.stdout, r.stdout[-2000:]
    fu.record("thin", f"a training run over thin images in train and val (in_memory={in_memory}, decode={decode})", 2 * len(THIN))


def test_thin_images_through_the_commands(tmp_path):
    """predict and attention report each unreadable image and go on (exit 1); eval and inspect over a
    folder skip them (exit 0)."""
    fu.make_folder(tmp_path / "data", per_class=4)
    thin_paths = write_thin(tmp_path / "data" / "class_2")
    model = fu.tiny_model(id2label={0: "class_0", 1: "class_1", 2: "class_2"})
    model.save_pretrained(tmp_path / "model")
    ckpt, good = str(tmp_path / "model"), str(tmp_path / "data" / "class_0" / "0.png")
    r = fu.run(["predict", "--checkpoint", ckpt, good, *map(str, thin_paths)], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.count(f"{good}: ") == 1 and r.stderr.count("cannot read") == len(THIN), r.stderr[-2000:]
    fu.assert_bounded(r)
    r = fu.run(["attention", "--checkpoint", ckpt, str(thin_paths[0]), good, "--out", str(tmp_path / "att")], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "longer than 100 times" in r.stderr, r.stderr[-2000:]
    assert os.listdir(tmp_path / "att") == ["0_attention.png"]
    r = fu.run(["eval", "--checkpoint", ckpt, "--data-dir", str(tmp_path / "data"), "--workers", "0"], tmp_path)
    assert r.returncode == 0 and f"skipped {len(THIN)} file(s)" in r.stdout and "Warning" not in r.stderr, r.stderr[-2000:]
    fu.assert_bounded(r)
    r = fu.run(["inspect", "--checkpoint", ckpt, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "fig7")], tmp_path)
    assert r.returncode == 0 and f"skipped {len(THIN)} unreadable image(s)" in r.stdout, r.stdout[-2000:]
    fu.assert_bounded(r)
    fu.record("thin", "thin images through predict, attention, eval --data-dir and inspect --data-dir", 4)


# -----------------------------------------------------------------------------
# class folders whose names a figure or a terminal cannot show as they are


ODD_NAMES = [b"bad\xff\nname", b"tab\tand\rreturn", "emoji \U0001f600".encode(), "\u202eright-to-left".encode(),
             b"x" * 200]


def test_class_folders_with_odd_names_train_plot_and_predict(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, name in enumerate(ODD_NAMES):
        folder = os.path.join(bytes(root), name)
        os.makedirs(folder)
        for i in range(6):
            a = (rng.random((16, 16, 3)) * 60).astype(np.uint8)
            a[:, :, c % 3] += 150
            a[: 4 * (c // 3 + 1)] = 255
            Image.fromarray(a).save(os.path.join(folder, b"%d.png" % i))
    params = fu.tiny_params(root, tmp_path / "run", epochs=1)
    r = fu.run(["--params", fu.write_params(tmp_path / "params.json", params)], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for png in ("confusion.png", "misclassified.png", "curves.png"):
        assert (tmp_path / "run" / png).stat().st_size > 0
    per_class = [line for line in r.stdout.splitlines() if line.startswith("per-class accuracy: ")]
    assert len(per_class) == 1 and per_class[0].count(" 0.") + per_class[0].count(" 1.") == len(ODD_NAMES), r.stdout[-2000:]
    image = os.path.join(bytes(root), ODD_NAMES[0], b"0.png")
    r = fu.run(["predict", "--checkpoint", str(tmp_path / "run"), os.fsdecode(image)], tmp_path)
    lines = r.stdout.strip().splitlines()  # the image's line (names with line breaks stay on it), then the summary
    assert r.returncode == 0 and len(lines) == 2 and lines[1].startswith("predicted 1 image(s)"), r.stderr[-2000:]
    r = fu.run(["attention", "--checkpoint", str(tmp_path / "run"), os.fsdecode(image)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    fu.record("names", "class folders named with invalid UTF-8, newlines, tabs, emoji, RTL marks and 200 characters", len(ODD_NAMES))
