"""The commands that use a finished model: eval, predict, attention and inspect (`python main.py CMD`).

Each takes the parsed arguments from main.py and loads its model with `load_model`, that is
`from_pretrained`, so a run folder, a training checkpoint and any pretrained source (HF folder,
timm file, Google .npz) all work.
"""

import os
import sys

import torch

from vit import distributed, engine
from vit import params as P
from vit.errors import UserError
from vit.loading import inference_info
from vit.model import ViTForImageClassification


def load_model(path, device):
    """An eval-mode classifier on `device` and its `inference_info`, from a run folder, a training
    checkpoint or any pretrained source."""
    model = ViTForImageClassification.from_pretrained(path)
    return model.to(device).eval(), inference_info(model)


def evaluate(args):
    """Accuracy of a checkpoint on --data-dir (a folder of class folders), or on the run's own val data."""
    import data

    d = distributed.init()
    model, info = load_model(args.checkpoint, d.device)
    run_params = info["params"] or P.defaults()  # a pretrained source has no run params
    data_params = dict(run_params["data"])
    batch_size = args.batch_size or run_params["train"]["batch_size"]
    if args.data_dir:
        from data.folder import scan_folder

        # the folder serves as both splits; files are read lazily, and only the val side is iterated
        data_params.update(dataset="folder", train_dir=args.data_dir, val_dir=args.data_dir, in_memory=False)
        batch_size = min(batch_size, scan_folder(args.data_dir, args.data_dir).report["train_files"])
    data_params.update(image_size=info["image_size"], channels=info["channels"], mean=info["mean"], std=info["std"])
    train_params = {**run_params["train"], "batch_size": batch_size, "randaugment": None}
    loaders = data.build_loaders(data_params, train_params, d.device, d.rank, d.world_size)
    if info["classes"] is not None and loaders.classes != info["classes"]:
        raise UserError(f"the classes in {args.data_dir} {loaders.classes} differ from the checkpoint's {info['classes']}.")
    if model.config.num_labels != len(loaders.classes):  # a source without class names can still disagree in count
        raise UserError(f"checkpoint {args.checkpoint} has a head for {model.config.num_labels} classes but "
                        f"{args.data_dir or 'the default dataset'} has {len(loaders.classes)} classes; pass --data-dir with a folder of its classes.")
    val = engine.evaluate(model, loaders.val, num_classes=len(loaders.classes), device=d.device, d=d,
                          oom_advice=f"pass a smaller --batch-size than {batch_size}.")
    print(" - ".join(f"{k}: {v:.4f}" for k, v in val.items()))
    return 0


def predict(args):
    """Print the top-k class names with probabilities for each image."""
    from data.images import BadImage, open_image
    from data.transforms import eval_transform

    device = distributed.init().device
    model, info = load_model(args.checkpoint, device)
    tf = eval_transform(info["image_size"], info["channels"], info["mean"], info["std"])
    classes = info["classes"] or [str(i) for i in range(model.config.num_labels)]
    failed = 0
    for path in args.images:
        try:
            x = tf(open_image(path, info["channels"]))[None].to(device)  # (1, C, H, W)
        except (BadImage, OSError) as e:
            print(f"{path}: cannot read ({e})", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            probs = model(x).logits.float().softmax(-1)[0]  # (K,)
        top = probs.topk(min(args.topk, len(classes)))
        print(f"{path}: " + ", ".join(f"{classes[i]} {p:.4f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))
    return 1 if failed else 0


def attention(args):
    """One attention-rollout PNG per image (vit/visualize.py)."""
    from vit import visualize

    out = args.out or _default_out(args.checkpoint, "attention")
    visualize.attention_command(args.checkpoint, args.images, out, distributed.init().device)
    return 0


def inspect(args):
    """The ViT paper's Figure 7 panels for the checkpoint (vit/visualize.py)."""
    from vit import visualize

    out = args.out or _default_out(args.checkpoint, "inspect")
    visualize.inspect_command(args.checkpoint, args.data_dir, out, distributed.init().device)
    return 0


def _default_out(checkpoint_path, name):
    """Next to the checkpoint: <run folder>/<name>."""
    folder = checkpoint_path if os.path.isdir(checkpoint_path) else os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.join(folder, name)
