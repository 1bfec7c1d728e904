"""`vit export`: a checkpoint to ONNX with a dynamic batch size, checked against PyTorch with onnxruntime.

The check is not optional: timm#2463 was an export that silently lost 7 points of accuracy. The
exported graph runs in onnxruntime on a few batches of random inputs beside the PyTorch model, and
the file is kept only when the largest difference is within CHECK_TOLERANCE; the difference is printed.

`--quantize int8` writes onnxruntime's dynamic int8 quantization of that checked graph instead
(vit/quantize.py), and prints how often it keeps float32's top-1 class on the `--images` given.

The image size is fixed at export: `--image-size` (default the checkpoint's) loads the model at that
size, resampling the position embeddings once as from_pretrained(image_size=...) does, so the graph
holds no resampling of its own. Only the batch dimension is dynamic.
"""

import importlib.util
import os
import shutil
import sys
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from vit.data.inputs import image_arguments, preprocess
from vit.errors import UserError, existing_parent, writing
from vit.factory import inference_info
from vit.model import ViTForImageClassification
from vit.quantize import Agreement, onnx_int8
from vit.viz.text import label

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # torch's exporter needs the first two, the check the third
CHECK_BATCHES = (1, 3)  # batch sizes checked with onnxruntime; the export traces batch 2
CHECK_TOLERANCE = 1e-4  # max |onnxruntime - torch|, relative to the largest |output| (or absolute below 1)
AGREE_BATCH = 32  # images per onnxruntime call when --quantize measures agreement
INLINE_LIMIT = 1 << 30  # bytes of weights kept inside the .onnx; above, they go to a .onnx.data beside it (protobuf stops at 2 GiB)


class Logits(nn.Module):
    """The classifier as a function from pixels to one tensor: logits (B, num_labels), or the (B, D)
    features for a model without a head. The exported graph's one input and one output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values).logits


def export_onnx(checkpoint: str, out: str, image_size: Optional[int] = None, ema: bool = False,
                quantize: Optional[str] = None, images: Sequence[str] = ()) -> float:
    """Write `out` (.onnx) from `checkpoint` with a dynamic batch size, after checking it with
    onnxruntime; returns the largest difference to PyTorch. quantize="int8" writes onnxruntime's
    dynamic int8 quantization of the checked graph instead, and prints its top-1 agreement with the
    float32 model on `images` (files or folders), which it needs."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"exporting to ONNX needs the packages {', '.join(ONNX_PACKAGES)} ({', '.join(missing)} missing); "
                        f"install them with pip install -r requirements.txt.")
    existing_parent(out, "--out")
    if quantize and not images:
        raise UserError(f"--quantize {quantize} needs --images with some images like the ones the model will see (files or "
                        f"a folder), to measure how often int8 keeps float32's top-1 class; e.g. --images data/samples.")
    files = image_arguments(images) if quantize else []
    overrides = {"image_size": image_size} if image_size is not None else {}
    model = ViTForImageClassification.from_pretrained(checkpoint, ema=ema, **overrides).eval()
    wrapped = Logits(model).eval()
    shape = (model.config.num_channels, model.config.image_size, model.config.image_size)
    gen = torch.Generator().manual_seed(0)
    tmp_dir = out + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        with writing(out, "choose another --out or free space there"):
            os.makedirs(os.path.join(tmp_dir, "int8"))  # beside --out, whose folder exists: no folder is made above it
            tmp = os.path.join(tmp_dir, os.path.basename(out))
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            with torch.no_grad():
                torch.onnx.export(wrapped, (torch.randn(2, *shape, generator=gen),), tmp, dynamo=True,
                                  input_names=["pixel_values"], output_names=["logits"],
                                  dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
                                  external_data=weights > INLINE_LIMIT, verbose=False)
            worst = check(wrapped, tmp, [torch.randn(b, *shape, generator=gen) for b in CHECK_BATCHES])
            if worst > CHECK_TOLERANCE:
                raise UserError(f"the ONNX export of {checkpoint} differs from PyTorch by up to {worst:.2e} (relative), above "
                                f"{CHECK_TOLERANCE:g}, so {out} was not written; report it with your torch and onnxruntime versions.")
            publish = tmp_dir
            if quantize:  # the int8 graph alone is written; the float32 one it came from stays behind
                publish = os.path.join(tmp_dir, "int8")
                onnx_int8(tmp, os.path.join(publish, os.path.basename(out)))
                agreement = agree(wrapped, os.path.join(publish, os.path.basename(out)), files, inference_info(model))
            for name in os.listdir(publish):  # the .onnx, and its .onnx.data when the weights are large
                if os.path.isfile(os.path.join(publish, name)):
                    os.replace(os.path.join(publish, name), os.path.join(os.path.dirname(os.path.abspath(out)), name))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    kind = "int8 weights (onnxruntime dynamic quantization) of a graph whose" if quantize else "a graph whose"
    print(f"wrote {out}: {kind} input is pixel_values (batch, {', '.join(map(str, shape))}) and output logits (batch, "
          f"{model.config.num_labels or model.config.hidden_size}); float32 onnxruntime vs PyTorch on batches "
          f"{', '.join(map(str, CHECK_BATCHES))}: max difference {worst:.2e} (relative; tolerance {CHECK_TOLERANCE:g})")
    if quantize:
        print(agreement.line())
        if agreement.warning():
            print(agreement.warning(), file=sys.stderr)
    return worst


def agree(wrapped, path, files, info):
    """quantize.Agreement of the graph at `path` with `wrapped` (PyTorch, float32) on the readable `files`,
    in batches of AGREE_BATCH; unreadable files are skipped with a line each, and none readable is refused."""
    import onnxruntime

    from vit.data.images import BadImage

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    agreement = Agreement("the int8 graph (onnxruntime)")
    for start in range(0, len(files), AGREE_BATCH):
        batch = []
        for f in files[start:start + AGREE_BATCH]:
            try:
                batch.append(preprocess(f, info))
            except (BadImage, OSError) as e:
                print(f"{label(f)}: cannot read ({label(e)}); skipped", file=sys.stderr)
        if batch:
            x = torch.cat(batch)
            with torch.no_grad():
                want = wrapped(x)
            (got,) = session.run(None, {"pixel_values": x.numpy()})
            agreement.add(want, torch.from_numpy(got))
    if not agreement.total:
        raise UserError(f"none of the --images could be read ({', '.join(files[:3])}...); pass readable images.")
    return agreement


def check(wrapped, path, inputs):
    """The largest |onnxruntime - torch| over `inputs`, relative to the largest |torch output| (or absolute below 1)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            want = wrapped(x).numpy()
        (got,) = session.run(None, {"pixel_values": x.numpy()})
        if got.shape != want.shape:
            raise UserError(f"the ONNX export gives shape {got.shape} for batch {len(x)} where PyTorch gives {want.shape}; "
                            f"report it with your torch and onnxruntime versions.")
        worst = max(worst, float(np.abs(got - want).max() / max(1.0, np.abs(want).max())))
    return worst
