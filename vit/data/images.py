"""Opening one image file robustly: every odd mode becomes plain "L" or "RGB", every broken file BadImage.

Policy, decided once for the whole project:
- EXIF orientation is applied, so a phone photo is seen the way a person sees it.
- Transparency (RGBA, LA, palette or RGB/L with a tRNS chunk) is composited on white. Dropping alpha
  instead would show whatever colour the encoder left under transparent pixels (often black).
- 16-bit grayscale ("I;16*" and "I", as PIL opens 16-bit PNGs) is scaled by 255/65535, not clipped.
- CMYK, YCbCr, LAB, HSV and 1-bit images are converted by PIL; grayscale <-> RGB by PIL's luma rule.
- Anything that cannot be decoded, including decompression-bomb sizes, raises BadImage; so do strips
  thinner than 1:MAX_ASPECT and images whose resize would exceed the bomb limit (a 2,000,000 x 1 PNG
  is 2 KB and under the limit, but 16 x 32,000,000 after its shorter side is resized to 16), and
  FIFOs, devices and sockets (opening one would wait forever). All of it is decided from the header.
"""

import io
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vit.errors import special_file_kind

# PIL warns (with a source line) when it opens a file over its pixel limit, and refuses one over twice it. The
# check below refuses both by name, counted with the other skipped files, so PIL's warning would only repeat it
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
EXIF_ORIENTATION = 0x0112
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own bomb limit (~89 M pixels); above it a file is refused
MAX_ASPECT = 100  # longer side / shorter side: wide panoramas pass, pixel strips do not


class BadImage(Exception):
    """A file that is not a decodable image; the message names the file and the reason."""


@contextmanager
def _as_bad_image(path):
    """Any error while reading `path` becomes BadImage naming it: a broken or fuzzed file can make PIL
    raise almost any exception type, and all of them mean "not a usable image"."""
    try:
        yield
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"{path}: {type(e).__name__}: {e}") from e


def check_regular(path):
    """BadImage for a FIFO, device or socket, from os.stat alone: before anything opens `path`."""
    kind = special_file_kind(path)
    if kind is not None:
        raise BadImage(f"{path}: it is {kind}, not an image file")


def check_header(path):
    """Cheap scan-time check (no pixel decode): non-empty, a known format, and not bomb-sized."""
    path = Path(path)
    check_regular(path)
    with _as_bad_image(path):
        if path.stat().st_size == 0:
            raise BadImage(f"{path}: zero-byte file")
        with Image.open(path) as im:
            _check_size(path, im)
            return im.size


def probe_jpeg(path, data, resize_to=None):
    """Header facts the device decoder needs from a file's bytes: (is a plain JPEG, (H, W) as shown,
    EXIF orientation 1..8). "Plain" means baseline/progressive "L" or "RGB" that nvjpeg decodes as
    PIL would; anything else (PNG, CMYK JPEG, ...) goes through open_image. Raises BadImage (see
    open_image for `resize_to`)."""
    with _as_bad_image(path), Image.open(io.BytesIO(data)) as im:
        _check_size(path, im, resize_to)
        orientation = im.getexif().get(EXIF_ORIENTATION, 1) if im.format == "JPEG" else 1
        plain = im.format == "JPEG" and im.mode in ("L", "RGB") and orientation in range(1, 9)
        w, h = im.size
    return plain, ((w, h) if orientation in (5, 6, 7, 8) else (h, w)), orientation


def open_image(path, channels, size_hint=None, resize_to=None):
    """Decode `path` to a PIL image in mode "L" (channels=1) or "RGB" (channels=3), or raise BadImage.

    size_hint: lets JPEG decode at a reduced scale that is still >= size_hint on both sides (faster).
    resize_to: the shorter side the caller resizes the image to; refused from the header when the
    resized image would be over MAX_PIXELS.
    """
    path = Path(path)
    check_regular(path)
    return _decode(path, path, channels, size_hint, resize_to)


def open_image_bytes(name, data, channels, resize_to=None):
    """open_image for a file's bytes (a tar shard's member); `name` names it in the BadImage message."""
    return _decode(name, io.BytesIO(data), channels, None, resize_to)


def _decode(name, source, channels, size_hint, resize_to):
    assert channels in (1, 3), channels
    with _as_bad_image(name), Image.open(source) as im:
        _check_size(name, im, resize_to)
        if size_hint is not None and im.format == "JPEG":
            im.draft(im.mode, (size_hint, size_hint))
        im.load()  # decode now, inside the with: truncated data fails here
        im = ImageOps.exif_transpose(im)
        return _to_mode(im, "L" if channels == 1 else "RGB")


def _check_size(path, im, resize_to=None):
    """Refuse decompression bombs, pixel strips and bombs-after-resize from the header, before any pixel is allocated."""
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise BadImage(f"{path}: {w}x{h} pixels is over the {MAX_PIXELS} pixel limit (decompression bomb?)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise BadImage(f"{path}: {w}x{h} pixels is longer than {MAX_ASPECT} times its width, a strip, not a picture")
    if resize_to is not None and resize_to * math.ceil(resize_to * max(w, h) / min(w, h)) > MAX_PIXELS:
        raise BadImage(f"{path}: {w}x{h} pixels, resized to a shorter side of {resize_to}, would be over the "
                       f"{MAX_PIXELS} pixel limit")


def _to_mode(im, mode):
    """Any PIL mode -> "L" or "RGB", with the policy in the module docstring."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit range: 65535 -> 255 (PIL's own convert would clip everything above 255 to white)
        a = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode != mode:
        im = im.convert(mode)
    return im
