"""JPEG folders decoded on the training device (data.decode "device"): workers only read bytes.

Why: PIL decodes a 500x375 JPEG and resizes it in about 5 ms per core, so even 16 workers top out
near 3,200 images/s, less than a fast ViT-B/16 training step takes in. Here a worker reads the
file, parses its header (format, mode, EXIF orientation, size) and draws the crop and flip from the
sample's seed; the trainer side decodes the whole batch with one `torchvision.io.decode_jpeg(list,
device=cuda)` call (nvjpeg) and crops, resizes, flips and normalizes it on the GPU. A background
thread does that on its own CUDA stream, PREFETCH batches ahead, so the training stream never waits
for it (with data.workers 0 everything runs inline: the thread would race the trainer on torch's RNG).

Same policy as the worker loader: a file nvjpeg does not take (PNG, CMYK JPEG, odd EXIF) is decoded
by PIL in the worker; a batch nvjpeg refuses is decoded again one file at a time, then by PIL, so a
corrupt file is dropped and counted by name instead of stopping the epoch. On the CPU the same code
decodes with libjpeg-turbo, which is how the tests check it.
Geometry: the same calls as data.transforms (RandomResizedCrop's rule drawn from the same seed, so a
sample gets the same crop and flip under both decoders; Resize + CenterCrop for eval), made by
torchvision's tensor functions on the device: antialiased bicubic, rounded to uint8 as PIL does.
"""

import queue
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from vit.data.images import BadImage, check_regular, open_image, probe_jpeg
from vit.data.transforms import resize_size
from vit.data.worker_loader import WorkerLoader, split_bad

PREFETCH = 2  # batches decoded ahead of the training step
BICUBIC = InterpolationMode.BICUBIC


@dataclass
class Encoded:
    """One sample as a worker hands it over: JPEG bytes (or PIL-decoded pixels), and where to crop."""
    path: str
    data: Optional[torch.Tensor]  # uint8 (nbytes,) of a plain JPEG, else None
    pixels: Optional[torch.Tensor]  # uint8 (C, H, W) decoded by PIL when data is None
    size: tuple  # (H, W) as shown, after EXIF orientation
    orientation: int = 1
    box: Optional[tuple] = None  # training crop (top, left, height, width) in the shown image; None: eval framing
    flip: bool = False


class EncodedSource:
    """Sample i -> Encoded for paths[i]: bytes and header for plain JPEGs, PIL pixels for the rest;
    `resize_to` is the eval resize's shorter side (see open_image)."""

    def __init__(self, paths, channels, resize_to=None):
        self.paths, self.channels, self.resize_to = [str(p) for p in paths], channels, resize_to

    def __len__(self):
        return len(self.paths)

    def __call__(self, i):
        path = self.paths[i]
        check_regular(path)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BadImage(f"{path}: {type(e).__name__}: {e}") from e
        plain, size, orientation = probe_jpeg(path, data, self.resize_to)
        if plain:
            return Encoded(path, torch.frombuffer(bytearray(data), dtype=torch.uint8), None, size, orientation)
        pixels = TF.pil_to_tensor(open_image(path, self.channels, resize_to=self.resize_to))  # (C, H, W) uint8, already oriented
        return Encoded(path, None, pixels, tuple(pixels.shape[1:]))


class CropPlan:
    """Encoded -> the same with its crop box and flip drawn (runs in the worker under the sample's seed)."""

    def __init__(self, image_size, train, *, scale, hflip):
        self.image_size, self.train, self.scale, self.hflip = image_size, train, tuple(scale), hflip

    def __call__(self, e):
        if self.train:  # torchvision's own rule, on a stand-in of the right size (meta: nothing allocated)
            e.box = RandomResizedCrop.get_params(torch.empty(1, *e.size, device="meta"), self.scale, (3 / 4, 4 / 3))
            e.flip = bool(torch.rand(1) < self.hflip)
        return e


def collate_encoded(batch):
    """-> ((list of Encoded, labels (B,)), messages of the bad samples), as collate_drop_bad does."""
    good, bad = split_bad(batch)
    if not good:
        return None, bad
    return ([e for e, _ in good], torch.tensor([y for _, y in good])), bad


class DeviceDecoder:
    """(list of Encoded, labels) -> (x float (B, C, S, S) normalized, y, bad messages) on `device`."""

    def __init__(self, image_size, channels, mean, std, device):
        self.image_size, self.channels, self.device = image_size, channels, torch.device(device)
        self.mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        # normalize straight from the 0..255 range: (x - 255 m) / (255 s)
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def __call__(self, batch):
        encoded, y = batch
        images, bad = self.decode(encoded)
        keep = [k for k, im in enumerate(images) if im is not None]
        if not keep:
            return None, None, bad
        S, R = self.image_size, resize_size(self.image_size)
        x = torch.empty(len(keep), self.channels, S, S, device=self.device)
        for row, k in enumerate(keep):  # sizes differ, so one resize per image; uint8 out, as PIL's
            box = encoded[k].box
            if box is None:  # eval_transform: shorter side to R, then the center S x S
                im = TF.center_crop(TF.resize(images[k], R, BICUBIC, antialias=True), S)
            else:
                im = TF.resized_crop(images[k], *box, [S, S], BICUBIC, antialias=True)
            x[row] = im
        flip = torch.tensor([encoded[k].flip for k in keep]).to(self.device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = y[keep].to(self.device, non_blocking=True)
        return (x - self.mean) / self.std, y, bad

    def decode(self, encoded):
        """-> ([uint8 (C, H, W) on the device, oriented, or None], messages of the files that failed)."""
        images, bad = [None] * len(encoded), []
        jpegs = [k for k, e in enumerate(encoded) if e.data is not None]
        try:  # one call for the batch: nvjpeg's batched decode on CUDA
            decoded = decode_jpeg([encoded[k].data for k in jpegs], mode=self.mode, device=self.device) if jpegs else []
        except RuntimeError:  # one bad file fails the whole call: find it
            decoded = [self._decode_one(encoded[k], bad) for k in jpegs]
        for k, im in zip(jpegs, decoded):
            images[k] = None if im is None else orient(im, encoded[k].orientation)
        for k, e in enumerate(encoded):
            if e.pixels is not None:
                images[k] = e.pixels.to(self.device, non_blocking=True)
        return images, bad

    def _decode_one(self, e, bad):
        """One file: nvjpeg alone, else PIL (which decodes some JPEGs nvjpeg refuses), else dropped."""
        try:
            return decode_jpeg(e.data, mode=self.mode, device=self.device)
        except RuntimeError:
            pass
        try:
            im = TF.pil_to_tensor(open_image(e.path, self.channels)).to(self.device)
        except BadImage as err:
            bad.append(str(err))
            return None
        e.orientation = 1  # open_image has applied it already
        return im


# EXIF orientation -> the transform that shows the image upright (PIL's ImageOps.exif_transpose table)
_ORIENT = {
    2: lambda x: x.flip(-1),  # mirrored
    3: lambda x: x.flip((-2, -1)),  # rotated 180
    4: lambda x: x.flip(-2),  # flipped upside down
    5: lambda x: x.transpose(-2, -1),  # transpose
    6: lambda x: torch.rot90(x, -1, (-2, -1)),  # shown rotated 90 degrees clockwise
    7: lambda x: x.transpose(-2, -1).flip((-2, -1)),  # transverse
    8: lambda x: torch.rot90(x, 1, (-2, -1)),  # shown rotated 90 degrees counter-clockwise
}


def orient(image, orientation):
    """(C, H, W) as stored -> as shown, for EXIF orientation 1..8."""
    return _ORIENT[orientation](image) if orientation in _ORIENT else image


class DeviceDecodeLoader(WorkerLoader):
    """WorkerLoader whose batches are decoded on the device by a background thread, PREFETCH ahead."""

    def _finished(self):
        if self.loader.num_workers == 0:  # the dataset would seed torch's global RNG from a second thread
            yield from WorkerLoader._finished(self)
            return
        out = queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def produce():
            try:
                with torch.cuda.stream(stream) if cuda else nullcontext():
                    for item in WorkerLoader._finished(self):
                        event = torch.cuda.Event() if cuda else None
                        if cuda:
                            event.record(stream)
                        if not _put(out, ("batch", item, event), stop):
                            return
            except BaseException as e:  # handed to the training thread, which raises it there
                _put(out, ("error", e, None), stop)
                return
            _put(out, ("done", None, None), stop)

        thread = threading.Thread(target=produce, name="device-decode", daemon=True)
        thread.start()
        try:
            while True:
                kind, item, event = out.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise item
                if cuda:  # the training stream waits for the decode stream, and keeps the memory alive
                    torch.cuda.current_stream(self.device).wait_event(event)
                    for t in item[:2]:
                        if t is not None:
                            t.record_stream(torch.cuda.current_stream(self.device))
                yield item
        finally:  # a loop that stops early (NaN, Ctrl-C): end the thread before the next pass reuses the workers
            stop.set()
            thread.join()


def _put(q, item, stop):
    """Queue put that gives up when the consumer has gone; False then."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
