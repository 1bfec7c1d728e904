"""int8 on the CPU against float32 and bf16: speed (interleaved) and top-1 agreement with float32.

Two models, as issue 22 asks: the default Fashion-MNIST model (a trained run folder, e.g. from
`python main.py --set train.epochs=3 output.dir=/tmp/fm3`), and a randomly initialised ViT-B/16 at 224
with a nearest-centroid head over its (random) features of Fashion-MNIST train images, so that its top-1
class depends on the image as a trained head's does (a bare random head gives nearly the same class for
every image, and agreement on that says nothing). Five ways to run each:

    torch fp32, torch bf16 (autocast), torch int8 (vit.quantize.dynamic_int8, what `predict --int8` runs),
    onnxruntime fp32 and onnxruntime int8 (vit.quantize.onnx_int8, what `export --quantize int8` writes).

Speed: each round runs one batch through every variant, order rotated, and the table gives the median
time and the median over rounds of the per-round ratio to torch fp32 (benchmarks/ab.py's protocol, for a
machine shared with other jobs). Agreement: the top-1 class against torch fp32's on the Fashion-MNIST
test images (all 10,000 for the small model; --b16-images of them for B/16, upsampled to 224 RGB).

    python benchmarks/int8.py --run /tmp/fm3                      # both models (B/16 takes minutes)
    python benchmarks/int8.py --run /tmp/fm3 --models fm --rounds 15
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from ab import interleaved, ratio
from common import cpu_threads

from vit import ViTConfig, ViTForImageClassification  # noqa: E402  (common put the repository on the path)
from vit.data.fashion_mnist import load_fashion_mnist
from vit.export import Logits
from vit.data.transforms import eval_transform
from vit.factory import load_model
from vit.quantize import dynamic_int8, onnx_int8

VARIANTS = ("torch fp32", "torch bf16", "torch int8", "ort fp32", "ort int8")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a trained default Fashion-MNIST run folder (or best.pt)")
    p.add_argument("--images", type=int, default=10000, help="test images for the small model's agreement")
    p.add_argument("--b16-images", type=int, default=200, help="test images for B/16's agreement (35 GFLOP each)")
    p.add_argument("--b16-fit-images", type=int, default=300, help="train images B/16's class centroids are taken over")
    p.add_argument("--batch", type=int, default=256, help="batch of the small model's timing")
    p.add_argument("--b16-batch", type=int, default=8, help="batch of B/16's timing")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads, torch's and onnxruntime's (default 1: on a shared machine a lone thread never "
                        "waits at a barrier for a core someone else took, benchmarks/ab.py's convention)")
    p.add_argument("--models", default="fm,b16", help="which tables: fm, b16 or both")
    return p.parse_args()


def images(split, count, info):
    """(count, C, S, S) Fashion-MNIST images through the eval transform of a model with `info`, and labels."""
    pixels, labels = load_fashion_mnist(split)
    transform = eval_transform(info["image_size"], info["channels"], info["mean"], info["std"])
    x = torch.stack([transform(Image.fromarray(np.asarray(a))) for a in pixels[:count]])
    return x, torch.as_tensor(np.asarray(labels[:count]))


def runners(model, example, folder):
    """{variant: x -> logits (float32, on the CPU)}: the five ways to run `model`."""
    import onnxruntime

    int8 = dynamic_int8(model)
    path = os.path.join(folder, "fp32.onnx")
    with torch.no_grad():
        torch.onnx.export(Logits(model).eval(), (example,), path, dynamo=True, input_names=["pixel_values"],
                          output_names=["logits"], dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
                          verbose=False)
    onnx_int8(path, os.path.join(folder, "int8.onnx"))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    sessions = {v: onnxruntime.InferenceSession(os.path.join(folder, f"{v[4:]}.onnx"), options,
                                                providers=["CPUExecutionProvider"]) for v in ("ort fp32", "ort int8")}

    def torch_run(m, bf16=False):
        def run(x):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return m(x).logits.float()
        return run

    def ort_run(session):
        return lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])

    return {"torch fp32": torch_run(model), "torch bf16": torch_run(model, bf16=True), "torch int8": torch_run(int8),
            "ort fp32": ort_run(sessions["ort fp32"]), "ort int8": ort_run(sessions["ort int8"])}


def measure(name, model, x, labels, batch, rounds):
    """Print one table: per variant, time per batch, speed against torch fp32, agreement and accuracy."""
    with tempfile.TemporaryDirectory() as folder:
        run = runners(model, x[:2], folder)
        timing = x[:batch]
        times = interleaved({v: (lambda f=f: f(timing)) for v, f in run.items()}, rounds, warmup=2, device=torch.device("cpu"))
        top1 = {}
        for v, f in run.items():
            t0 = time.perf_counter()
            top1[v] = torch.cat([f(x[i:i + batch]).argmax(-1) for i in range(0, len(x), batch)])
            print(f"  ({name}: {v} over {len(x):,} images in {time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n{name}: batch {batch}, {torch.get_num_threads()} thread(s), {rounds} interleaved rounds; agreement on "
          f"{len(x):,} Fashion-MNIST test images; load average {os.getloadavg()[0]:.1f} at the end")
    print("| variant | ms / batch (median) | images/s | x torch fp32 (median of ratios) | top-1 = torch fp32 | accuracy |")
    print("|---|---|---|---|---|---|")
    for v in VARIANTS:
        same = (top1[v] == top1["torch fp32"]).float().mean().item()
        acc = (top1[v] == labels).float().mean().item()
        rate = batch / statistics.median(times[v])
        print(f"| {v} | {1e3 * statistics.median(times[v]):,.1f} | {rate:,.{0 if rate >= 100 else 2}f} | "
              f"{ratio(times, v, 'torch fp32'):.2f} | {same:.2%} | {acc:.2%} |")


def fitted_b16(fit_images):
    """A random ViT-B/16 at 224 with a 10-class nearest-centroid head: each class's weight is the mean of its
    centred features over `fit_images` Fashion-MNIST train images, normalised (a least-squares head on fewer
    images than features interpolates them, and its huge weights turn any rounding into another class)."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig.from_preset("B/16", num_labels=10, layer_norm_eps=1e-6)).eval()
    info = {"image_size": 224, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    x, y = images("train", fit_images, info)
    with torch.no_grad():
        f = torch.cat([model.forward_head(model.forward_features(x[i:i + 16]), pre_logits=True) for i in range(0, len(x), 16)])
        mean = f.mean(0)
        w = torch.stack([(f[y == c] - mean).mean(0) for c in range(10)])  # (10, D)
        w = w / w.norm(dim=1, keepdim=True)
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(-(w @ mean))  # logits = w (f - mean)
    return model, info


def main():
    args = parse_args()
    cpu_threads(torch.device("cpu"), args.threads)
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    if "fm" in args.models.split(","):
        model, info = load_model(args.run, torch.device("cpu"))
        x, labels = images("val", args.images, info)
        measure(f"default Fashion-MNIST model ({args.run})", model, x, labels, args.batch, args.rounds)
    if "b16" in args.models.split(","):
        model, info = fitted_b16(args.b16_fit_images)
        x, labels = images("val", args.b16_images, info)
        measure("ViT-B/16 at 224 (random weights, nearest-centroid head)", model, x, labels, args.b16_batch, args.rounds)


if __name__ == "__main__":
    main()
