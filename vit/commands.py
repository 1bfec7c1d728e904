"""The commands that use a finished model: eval, attention, inspect and features (`vit CMD`, `python main.py CMD`;
predict, with its batches and output files, is vit/predict.py).

Each loads its model with vit/factory.py's `load_model`, that is `from_pretrained`, so a run folder, a
training checkpoint and any pretrained source (HF folder, timm file, Google .npz) all work. The files
they read (images, folders) are read here; the numbers come from vit/viz/analysis.py and the figures
from vit/viz/plots.py. Nothing here imports the training code (vit/train/): inference needs the model,
the loader and the evaluation pass only.
"""

import json
import math
import os
import sys
from typing import Optional, Sequence

import torch

from vit import distributed, evaluation
from vit import params as P
from vit.errors import UserError, existing_parent, writing
from vit.factory import load_model
from vit.files import atomic_write
from vit.loading.core import ZERO_HEAD, is_zero_head
from vit.viz.text import label

INSPECT_IMAGES = 64  # images the attention distance is averaged over
FEATURES_BATCH = 64  # images per forward pass in `features`
FIGURE_ADVICE = "free space there or pass --out with another folder"  # a figure's write failed
OUT_ADVICE = "choose another --out or free space there"  # features', predict's or export's --out failed


def unreadable_exit_code(unreadable: int) -> int:
    """The exit code of a command that did what it could with the images it was given (predict, attention,
    features): 1 when any of them could not be read (each said why), else 0; the policy in one place."""
    return 1 if unreadable else 0


def warn_zero_head(model, checkpoint):
    """True, with a warning, when the head gives every class the same logit (an in21k release's)."""
    if not is_zero_head(model):
        return False
    print(f"warning: {checkpoint}: {ZERO_HEAD}, so every class gets the same score and there is no prediction to show; "
          f"fine-tune it, or use `features` for its embeddings.", file=sys.stderr)
    return True


def evaluate(checkpoint: str, data_dir: Optional[str] = None, batch_size: Optional[int] = None,
             workers: Optional[int] = None, ema: bool = False, out: Optional[str] = None, device: str = "auto") -> int:
    """Accuracy of a checkpoint on `data_dir` (a folder of class folders), or on the run's own val data;
    `workers` decode images (default: the run's data.workers, at most the CPU count). With `out`, the
    results go to that JSON file too (`eval_results`); `device` as --device says (auto, cpu, cuda, mps)."""
    from vit import data

    for option, value, least in (("--batch-size", batch_size, 1), ("--workers", workers, 0)):
        if value is not None and value < least:
            raise UserError(f"{option} {value} must be {least} or more.")
    if out is not None:
        existing_parent(out, "--out")
    d = distributed.init(device, key="--device")
    model, info = load_model(checkpoint, d.device, ema)
    run_params = P.defaults()  # a pretrained source has no run params, a run older than a key lacks that key
    for section, keys in (info["params"] or {}).items():
        run_params.setdefault(section, {}).update(keys)
    try:
        P.check_leaves(run_params, ("data", "train"))  # what eval reads of them
    except UserError as e:
        raise UserError(f"checkpoint {model.load_report.path} carries params that no longer validate ({e}); "
                        f"pass --data-dir with a folder of its classes.") from None
    data_params = dict(run_params["data"])
    data_params["workers"] = min(data_params["workers"], os.cpu_count() or 1) if workers is None else workers
    batch_size = batch_size or run_params["train"]["batch_size"]
    if data_dir:
        from vit.data.folder import scan_folder

        # the folder serves as both splits; files are read lazily, and only the val side is iterated
        data_params.update(dataset="folder", train_dir=data_dir, val_dir=data_dir, in_memory=False)
        # quiet: build_loaders scans it again and says which files it skips then
        batch_size = min(batch_size, scan_folder(data_dir, data_dir, keys=("--data-dir", "--data-dir"), quiet=True).report["train_files"])
    data_params.update(image_size=info["image_size"], channels=info["channels"], mean=info["mean"], std=info["std"])
    train_params = {**run_params["train"], "batch_size": batch_size, "randaugment": None}
    loaders = data.build_loaders(data_params, train_params, d.device, d.rank, d.world_size)
    if info["classes"] is not None and loaders.classes != info["classes"]:
        raise UserError(f"the classes in {data_dir} {loaders.classes} differ from the checkpoint's {info['classes']}.")
    if model.config.num_labels != len(loaders.classes):  # a source without class names can still disagree in count
        raise UserError(f"checkpoint {checkpoint} has a head for {model.config.num_labels} classes but "
                        f"{data_dir or 'the default dataset'} has {len(loaders.classes)} classes; pass --data-dir with a folder of its classes.")
    if loaders.val is None:
        which = "data.val_shards is null" if data_params["dataset"] == "webdataset" else f"val split of {data_params['train_dir']} is empty"
        raise UserError(f"the run's {which}; pass --data-dir with a folder of its classes.")
    described = _eval_data(data_params, data_dir, loaders.report["val_files"])
    print(f"evaluating {model.load_report.path} on {described} ({data_params['workers']} worker(s), batch {batch_size})")
    val = evaluation.evaluate(model, loaders.val, num_classes=len(loaders.classes), d=d,
                              oom_advice=f"pass a smaller --batch-size than {batch_size}.", confusion=out is not None)
    scores = " - ".join(f"{k}: {val[k]:.4f}" for k in SCORES if k in val)
    print(f"{scores} - images/s: {val['images_per_s']:,.0f}")
    if out is not None and d.is_main:
        results = eval_results(val, loaders.classes, model.load_report.path, ema,
                               {"read": described, "images": loaders.report["val_files"], "batch_size": batch_size,
                                **{k: data_params[k] for k in EVAL_DATA_KEYS}})
        with writing(out, OUT_ADVICE):
            atomic_write(out, lambda f: json.dump(results, f, indent=2, allow_nan=False), mode="w")
        print(f"wrote {out}: the metrics, per-class accuracy and the confusion matrix")
    return 0


SCORES = ("loss", "acc", "top5")  # what eval prints and writes, besides images/s
EVAL_DATA_KEYS = ("dataset", "train_dir", "val_dir", "val_split", "split_seed", "image_size", "channels", "mean", "std")


def eval_results(val: dict, classes: list, checkpoint: str, ema: bool, data: dict) -> dict:
    """What `eval --out` writes: the metrics of evaluation `val` (with its confusion matrix) with the
    checkpoint and the data they came from, per-class accuracy and the confusion matrix (rows: the true
    class, columns: the predicted one). A loss that is not finite is written as null: valid JSON."""
    def number(v):
        return v if math.isfinite(v) else None

    return {"checkpoint": checkpoint, "ema": ema, "data": data,
            "metrics": {**{k: number(val[k]) for k in SCORES if k in val}, "images_per_s": number(val["images_per_s"])},
            "classes": list(classes),
            "per_class_accuracy": evaluation.per_class_accuracy(val["confusion"], classes),
            "confusion": val["confusion"].tolist()}


def _eval_data(data_params, data_dir, count):
    """What eval reads, in words: `--data-dir X (N images)`, the Fashion-MNIST test set, or the run's val folder or split."""
    if data_dir:
        return f"--data-dir {data_dir} ({count} images)"
    if data_params["dataset"] == "fashion_mnist":
        return f"the Fashion-MNIST test set ({count} images)"
    if data_params["dataset"] == "webdataset":
        return f"the run's data.val_shards {data_params['val_shards']} ({count} images)"
    if data_params["val_dir"]:
        return f"the run's data.val_dir {data_params['val_dir']} ({count} images)"
    return (f"the run's val split of {data_params['train_dir']} ({count} images: data.val_split {data_params['val_split']}, "
            f"data.split_seed {data_params['split_seed']})")


def read_each(paths: Sequence[str], info: dict, skipped: list):
    """(path, the eval-transformed image (1, C, H, W)) for each of `paths` that can be read. The policy of
    the commands that take images by name (predict, attention, features): an unreadable one is a line on
    stderr and is appended to `skipped`, the others are done, and the command exits 1 at the end. (eval
    and inspect read folders of data, as training does: bad files are skipped and counted, exit 0.)"""
    from vit.data.images import BadImage
    from vit.data.inputs import preprocess

    for path in paths:
        try:
            x = preprocess(path, info)
        except (BadImage, OSError) as e:
            print(f"{label(path)}: cannot read ({label(e)}); skipped", file=sys.stderr)
            skipped.append(path)
            continue
        yield path, x


def attention(checkpoint: str, images: Sequence[str], out: Optional[str] = None, device: str = "auto",
              ema: bool = False) -> int:
    """Write <out>/<image stem>_attention.png per image (default out: <run folder>/attention, created in an
    existing folder): the rollout overlay, the last layer's heads and the prediction (none from a head of
    zeros), and print each path. Returns the exit code, 1 when an image could not be read (see `read_each`)."""
    from vit.data import denormalize
    from vit.data.inputs import image_arguments
    from vit.viz import analysis, plots

    images = image_arguments(images)
    device = distributed.init(device, key="--device").device
    out_dir = out or _default_out(checkpoint, "attention")
    existing_parent(out_dir, "--out")
    model, info = load_model(checkpoint, device, ema)
    if not model.config.class_token:
        raise UserError(f"checkpoint {checkpoint} has no class token (class_token=false), and the attention maps show the "
                        f"class token's attention; use a checkpoint with one, or `inspect` for its attention distances.")
    prefix = model.config.num_prefix_tokens
    zero_head = warn_zero_head(model, checkpoint)
    written, skipped = [], []
    for path, x in read_each(images, info, skipped):
        x = x.to(device)  # (1, C, H, W)
        attentions, logits = analysis.attentions_and_logits(model, x)
        rollout = analysis.cls_rollout_map(attentions, num_prefix_tokens=prefix)[0].cpu().numpy()  # (gh, gw)
        heads = analysis.last_layer_cls_attention(attentions, num_prefix_tokens=prefix)[0].cpu().numpy()  # (heads, gh, gw)
        image = denormalize(x.cpu(), info["mean"], info["std"])[0]  # (H, W, C) uint8, what the model saw
        stem = os.path.splitext(os.path.basename(path))[0]
        if logits is None:
            verdict = "no classification head, attention maps only"
        elif zero_head:
            verdict = "the head is all zeros, no prediction; attention maps only"
        else:
            prob, index = logits.float().softmax(dim=-1)[0].max(dim=0)
            verdict = f"predicted {_class_name(info, index.item())} ({prob.item():.1%})"
        png, k = os.path.join(out_dir, f"{stem}_attention.png"), 1
        while png in written:  # two inputs with one file name, e.g. a/img.png and b/img.png
            png, k = os.path.join(out_dir, f"{stem}_{k}_attention.png"), k + 1
        with writing(png, FIGURE_ADVICE):
            plots.plot_attention(image, rollout, heads, png, f"{stem}: {verdict}")
        print(f"{label(path)}: {verdict}; wrote {label(png)}")
        written.append(png)
    return unreadable_exit_code(len(skipped))


def inspect(checkpoint: str, data_dir: Optional[str] = None, out: Optional[str] = None, device: str = "auto",
            ema: bool = False) -> list[str]:
    """Write the ViT paper's Figure 7 panels into `out` (default: <run folder>/inspect):
    embedding_filters.png, position_similarity.png and attention_distance.png. Returns the paths written.

    The attention distance is averaged over up to INSPECT_IMAGES images from `data_dir`. Without one,
    a checkpoint trained on the embedded Fashion-MNIST default (its class names) uses that test set;
    any other checkpoint skips this figure with a message, as no image set fits them all.
    """
    from vit.viz import analysis, plots

    device = distributed.init(device, key="--device").device
    out_dir = out or _default_out(checkpoint, "inspect")
    existing_parent(out_dir, "--out")
    model, info = load_model(checkpoint, device, ema)
    embeddings = model.vit.embeddings
    written = []

    png = os.path.join(out_dir, "embedding_filters.png")
    with writing(png, FIGURE_ADVICE):
        plots.plot_embedding_filters(analysis.embedding_filter_components(embeddings.patch_embeddings.projection.weight), png)
    written.append(png)

    png = os.path.join(out_dir, "position_similarity.png")
    with writing(png, FIGURE_ADVICE):
        plots.plot_position_similarity(analysis.position_similarity(embeddings.position_embeddings,
                                                                    num_prefix_tokens=model.config.num_pos_prefix_tokens), png)
    written.append(png)

    if data_dir is not None:
        images, source = _folder_images(data_dir, info), data_dir
    else:
        images, source = _fashion_mnist_images(info), "the Fashion-MNIST test set"
    if images is None:
        print("inspect: no --data-dir given (and the checkpoint is not a Fashion-MNIST one), so no attention-distance "
              "figure; pass --data-dir with a folder of images to get it")
    else:
        png = os.path.join(out_dir, "attention_distance.png")
        with writing(png, FIGURE_ADVICE):
            plots.plot_attention_distance(analysis.dataset_attention_distance(model, images, device).numpy(), png)
        print(f"inspect: attention distance averaged over {len(images)} images from {source}")
        written.append(png)
    for png in written:
        print(f"wrote {png}")
    return written


def features(checkpoint: str, inputs: Sequence[str], out: str, batch_size: int = FEATURES_BATCH, ema: bool = False,
             device: str = "auto") -> int:
    """Write the pooled embeddings of the images in `inputs` (files, and folders searched recursively)
    to `out` (in an existing folder) as an (N, D) float32 .npy: per image the vector the head sees
    (forward_head(pre_logits=True)), for retrieval and linear probes. Their paths, one a line in the
    same order, go to <out stem>.txt. Returns the exit code, 1 when an image could not be read (see `read_each`)."""
    import numpy as np

    from vit.data.inputs import image_arguments

    if not out.endswith(".npy"):
        raise UserError(f"--out {out} must end in .npy (the file order goes beside it as .txt); e.g. --out feats.npy.")
    existing_parent(out, "--out")
    device = distributed.init(device, key="--device").device
    model, info = load_model(checkpoint, device, ema)
    files = image_arguments(inputs)
    rows, kept, batch, skipped = [], [], [], []

    def flush():
        with torch.no_grad():
            x = torch.cat([b for _, b in batch]).to(device)  # (b, C, H, W)
            rows.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu().numpy())  # (b, D)
        kept.extend(path for path, _ in batch)
        batch.clear()

    for path, x in read_each(files, info, skipped):
        batch.append((path, x))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not kept:
        raise UserError(f"no readable images in {', '.join(inputs)}; pass image files or folders that hold some.")
    listing = out[: -len(".npy")] + ".txt"
    with writing(out, OUT_ADVICE):
        atomic_write(out, lambda f: np.save(f, np.concatenate(rows)))
        atomic_write(listing, lambda f: f.write("".join(p + "\n" for p in kept)), mode="w")
    print(f"wrote {out}: {len(kept)} x {rows[0].shape[1]} embeddings (float32), file order in {listing}"
          + (f"; skipped {len(skipped)} unreadable" if skipped else ""))
    return unreadable_exit_code(len(skipped))


# -----------------------------------------------------------------------------
# reading images for the commands


def _default_out(checkpoint_path, name):
    """Next to the checkpoint: <run folder>/<name>."""
    folder = checkpoint_path if os.path.isdir(checkpoint_path) else os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.join(folder, name)


def _class_name(info, index):
    classes = info.get("classes")
    return label(classes[index]) if classes else str(index)


def _image_files(folder):
    """Up to INSPECT_IMAGES image files under folder, spread evenly over its sorted listing (so over classes)."""
    from vit.data.images import IMAGE_EXTENSIONS
    from vit.data.inputs import images_under

    if not os.path.isdir(folder):
        raise UserError(f"--data-dir {folder} is not a folder; pass a folder of images (class subfolders are fine).")
    files = images_under(folder)
    if not files:
        raise UserError(f"--data-dir {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); pass a folder of images.")
    step = max(1, len(files) // INSPECT_IMAGES)
    return files[::step][:INSPECT_IMAGES]


def _folder_images(folder, info):
    """Eval-transformed images from a folder, (n, C, H, W); unreadable files are skipped with a count."""
    from vit.data.images import BadImage
    from vit.data.inputs import preprocess

    images, skipped = [], 0
    for path in _image_files(folder):
        try:
            images.append(preprocess(path, info))
        except BadImage:
            skipped += 1
    if skipped:
        print(f"inspect: skipped {skipped} unreadable image(s) in {folder}")
    if not images:
        raise UserError(f"none of the images in --data-dir {folder} could be read; pass a folder of readable images.")
    return torch.cat(images)


def _fashion_mnist_images(info):
    """The embedded default's test images, (n, C, H, W), when the checkpoint was trained on it (same classes); else None."""
    from PIL import Image

    from vit.data.fashion_mnist import CLASSES, load_fashion_mnist
    from vit.data.transforms import eval_transform

    if info.get("classes") != CLASSES:
        return None
    images, _ = load_fashion_mnist("val")  # (10000, 28, 28) uint8
    transform = eval_transform(info["image_size"], info["channels"], info["mean"], info["std"])
    step = len(images) // INSPECT_IMAGES
    return torch.stack([transform(Image.fromarray(a)) for a in images[::step][:INSPECT_IMAGES]])
