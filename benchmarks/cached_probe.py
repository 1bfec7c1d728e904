"""The linear probe with and without train.cache_features, on a ViT-B/16-shaped backbone at 224.

A generated folder of --images JPEGs (10 classes, 224x224) and configs/linear_probe.json with a
randomly initialised B/16 instead of the in21k file (the speed is the same; no weights are downloaded),
augmentation off and bf16. Three runs, each `python main.py` in its own process, timed from launch:

1. cached, --epochs epochs: the backbone runs once over every image, then the head trains over the cache;
2. uncached, --uncached-epochs epochs: the backbone runs over every image every epoch. A 20-epoch uncached
   B/16 probe costs hours on a 2-core CPU, so this measures its epochs and the table extrapolates;
3. cached, --uncached-epochs epochs, its run folder seeded with run 1's features.safetensors (read back,
   not extracted): the same schedule as run 2, so their accuracies must be equal.

    python benchmarks/cached_probe.py --out /tmp/probe            # 2,000 images, 20 epochs against 1
    python benchmarks/cached_probe.py --out /tmp/probe --images 200 --epochs 5   # a quick look

It prints a table (wall time, per-epoch time, val_acc) with the load average at each run's start and end.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a folder for the images and the three run folders")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--uncached-epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--preset", default="B/16", help="the backbone's shape (Ti/16 for a quick try of this script)")
    return p.parse_args()


def make_images(folder, count, size=224, classes=10, seed=0):
    """count JPEGs in `classes` class folders: a class is a colour and a stripe position, under noise."""
    if os.path.isdir(folder) and sum(len(f) for _, _, f in os.walk(folder)) == count:
        return
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        c = i % classes
        os.makedirs(os.path.join(folder, f"class_{c}"), exist_ok=True)
        a = (rng.random((size, size, 3)) * 90).astype(np.uint8)
        a[:, :, c % 3] += 120
        band = (c // 3) * size // 4
        a[band:band + size // 8] = 230
        Image.fromarray(a).save(os.path.join(folder, f"class_{c}", f"{i}.jpg"), quality=90)


def run(out, images, cache, epochs, batch, preset, seed_cache=None):
    """One `python main.py` probe; returns (wall seconds, load averages at start and end, metrics records)."""
    run_dir = os.path.join(out, f"{'cached' if cache else 'uncached'}_{epochs}")
    shutil.rmtree(run_dir, ignore_errors=True)
    if seed_cache:
        os.makedirs(run_dir)
        shutil.copy(seed_cache, os.path.join(run_dir, "features.safetensors"))
    sets = ["model.pretrained=null", f"model.preset={preset}", f"data.train_dir={images}", "data.image_size=224",
            "data.workers=2", "train.precision=bf16", f"train.epochs={epochs}", f"train.batch_size={batch}",
            "train.random_resized_crop_scale=[1,1]", "train.hflip=0", f"train.cache_features={json.dumps(cache)}",
            f"output.dir={run_dir}"]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "main.py", "--params", "configs/linear_probe.json", "--set", *sets], cwd=ROOT,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"run failed ({run_dir}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    print(next((line for line in r.stdout.splitlines() if line.startswith("feature cache:")), "(no cache)"), flush=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return wall, (load, os.getloadavg()[0]), records, run_dir


def main():
    args = parse_args()
    images = os.path.join(args.out, "images")
    make_images(images, args.images)
    cached = run(args.out, images, True, args.epochs, args.batch, args.preset)
    uncached = run(args.out, images, False, args.uncached_epochs, args.batch, args.preset)
    again = run(args.out, images, True, args.uncached_epochs, args.batch, args.preset,
                seed_cache=os.path.join(cached[3], "features.safetensors"))
    print(f"\nViT-{args.preset} (random init) linear probe on {args.images:,} generated 224x224 JPEGs, bf16, batch {args.batch}, "
          f"{os.cpu_count()} CPU(s)")
    print("| run | epochs | wall (launch to done) | mean epoch_s | val_acc by epoch | load average start / end |")
    print("|---|---|---|---|---|---|")
    for name, (wall, (l0, l1), records, _) in (("cached", cached), ("uncached", uncached), ("cached, features read back", again)):
        epoch_s = sum(r["epoch_s"] for r in records) / len(records)
        print(f"| {name} | {len(records)} | {wall:,.0f} s | {epoch_s:,.1f} s | "
              f"{', '.join(format(r['val_acc'], '.4f') for r in records)} | {l0:.1f} / {l1:.1f} |")
    u_wall, _, u_records, _ = uncached
    per_epoch = sum(r["epoch_s"] for r in u_records) / len(u_records)
    setup = u_wall - sum(r["epoch_s"] for r in u_records)  # start-up, imports, the end-of-run report
    estimate = setup + args.epochs * per_epoch
    print(f"\nuncached {args.epochs} epochs, extrapolated: {setup:,.0f} s outside the epochs + {args.epochs} x "
          f"{per_epoch:,.0f} s = {estimate:,.0f} s ({estimate / 60:,.0f} min); cached, measured: {cached[0]:,.0f} s: "
          f"{estimate / cached[0]:.1f}x faster")
    same = [r["val_acc"] for r in uncached[2]] == [r["val_acc"] for r in again[2]]
    print(f"equal accuracy over {args.uncached_epochs} epoch(s), cached (features read back) against uncached: {same}")


if __name__ == "__main__":
    main()
