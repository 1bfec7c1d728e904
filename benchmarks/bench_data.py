"""Does the GPU wait for data? Training img/s on synthetic batches against img/s through data.build_loaders.

1. A folder of ImageNet-sized JPEGs (500x375 or 375x500, about 100 KB each, 10 class folders) is
   generated once into benchmarks/out/ (gitignored) and reused while its stamp matches.
2. For ViT (B/16 on CUDA): model-only training throughput on batches already on the device, then
   end-to-end throughput reading the folder through the project's loaders: worker processes decoding
   JPEGs with PIL ("workers"), workers reading bytes and the device decoding them with nvjpeg
   ("device", data.decode "device"), and the folder decoded once onto the device ("tensor"); the
   issue's target is end-to-end >= 0.9 x model-only for a folder read from disk on a 16-core machine.
3. The same for Fashion-MNIST with params.json's recipe model and its on-device tensor loader.
Each loader is also timed alone (no model), which says how much headroom the data has.
4. With --shards, only this: the same JPEGs written as webdataset tar shards (`vit shards`) against the
   folder, each read by the PIL workers at 224 with the training augmentation, no model: images/s of
   whole epochs (worker start included), in interleaved rounds after one warm-up epoch of each.

    python benchmarks/bench_data.py                  # GPU: B/16, batch 256, 20000 JPEGs, all cores
    python benchmarks/bench_data.py --small          # CPU smoke size: Ti/16, batch 8, 96 JPEGs
    python benchmarks/bench_data.py --shards --images 2000 --workers 2 --batch 32 --rounds 3   # shards vs folder
"""

import argparse
import itertools
import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import ROOT, Logits, build_model, cpu_threads, environment, make_optimizer, sync, train_step

from vit import data  # noqa: E402  (common put the repository root on sys.path)
from vit import params as vit_params  # noqa: E402
from vit.factory import build_model as build_trained_model  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
NOISE_SIGMA = 20  # pixel noise on smooth colour fields: about 100 KB per 500x375 JPEG at quality 90, like ImageNet


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CPU smoke size: Ti/16, batch 8, 96 images, few steps")
    p.add_argument("--model", default=None, help="preset for the JPEG part (default B/16; --small: Ti/16)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 256; --small: 8)")
    p.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 20000; --small: 96)")
    p.add_argument("--workers", type=int, default=None, help="loader worker processes (default: all cores; --small: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 50; --small: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 15; --small: 1)")
    p.add_argument("--loaders", default="workers,device,tensor", help="JPEG-folder loaders to time: workers, device, tensor")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA yes, on the CPU no)")
    p.add_argument("--fm-params", default=os.path.join(ROOT, "params.json"),
                   help="params file whose model is timed on Fashion-MNIST ('' to skip that part)")
    p.add_argument("--fm-batch", type=int, default=None, help="Fashion-MNIST batch (default: the params file's; --small: 32)")
    p.add_argument("--dir", default=os.path.join(ROOT, "benchmarks", "out", "jpegs"), help="where the JPEGs go")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default 1 on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_data.json"))
    p.add_argument("--shards", action="store_true", help="only compare webdataset shards with the folder, loader alone")
    p.add_argument("--rounds", type=int, default=3, help="--shards: interleaved rounds of one epoch each")
    p.add_argument("--per-shard", type=int, default=250, help="--shards: samples per shard")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("Ti/16" if args.small else "B/16")
    args.batch = args.batch or (8 if args.small else 256)
    args.images = args.images or (96 if args.small else 20000)
    args.workers = args.workers if args.workers is not None else (1 if args.small else os.cpu_count())
    args.steps = args.steps or (3 if args.small else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 15)
    args.fm_batch = args.fm_batch or (32 if args.small else None)
    args.compile = cuda if args.compile is None else args.compile
    args.loaders = args.loaders.split(",")
    return args


# -----------------------------------------------------------------------------
# the JPEG folder


def _write_jpeg(job):
    """One random-ish photo-sized JPEG: a smooth random colour field plus pixel noise."""
    path, seed = job
    rng = np.random.default_rng(seed)
    w, h = (500, 375) if rng.random() < 0.75 else (375, 500)  # ImageNet's two usual framings
    low = rng.integers(0, 256, (rng.integers(3, 12), rng.integers(3, 12), 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
    noise = _noise_tile()
    y, x = rng.integers(0, noise.shape[0] - h), rng.integers(0, noise.shape[1] - w)
    pixels = (field + noise[y:y + h, x:x + w]).clip(0, 255).astype(np.uint8)  # (h, w, 3)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


_NOISE = None


def _noise_tile():
    # one noise tile per process, cropped at random offsets: drawing fresh noise per image is the slow part
    global _NOISE
    if _NOISE is None:
        rng = np.random.default_rng(os.getpid())
        _NOISE = rng.normal(0, NOISE_SIGMA, (1024, 1024, 3)).astype(np.int16)
    return _NOISE


def make_jpeg_folder(root, n, classes=10):
    """Write n JPEGs as root/class_k/img_i.jpg, unless root already holds exactly these; -> stats."""
    root = Path(root)
    stamp = root / "stamp.json"
    want = {"images": n, "classes": classes, "sigma": NOISE_SIGMA}
    if stamp.exists() and json.loads(stamp.read_text()).get("want") == want:
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / f"class_{i % classes}" / f"img_{i:06d}.jpg"), i) for i in range(n)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        sizes = pool.map(_write_jpeg, jobs, chunksize=16)
    info = {"want": want, "mean_kb": float(np.mean(sizes)) / 1e3, "total_mb": sum(sizes) / 1e6,
            "generate_s": time.perf_counter() - t0}
    stamp.write_text(json.dumps(info))
    return info


# -----------------------------------------------------------------------------
# timing loops


def endless(loader):
    """Batches from a loader, epoch after epoch (set_epoch each time, as training does)."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def img_per_s(step, batches, warmup, steps, device):
    """Images per second of step(x, y) over `steps` batches from the iterator, after `warmup` untimed ones.

    Wall clock around the whole loop (synchronized at both ends): the data's waits must count.
    """
    for _ in range(warmup):
        step(*next(batches))
    sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(batches)
        step(x, y)
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def synthetic(batch, shape, classes, device):
    """Three random batches already on the device, repeated forever: the data costs nothing."""
    g = torch.Generator(device=device).manual_seed(0)
    xs = [(torch.randn(batch, *shape, device=device, generator=g),
           torch.randint(0, classes, (batch,), device=device, generator=g)) for _ in range(3)]
    return itertools.cycle(xs)


def pipeline_case(name, model, loader_fn, batch, shape, classes, args, device):
    """Loader alone, model alone (before and after), and both together; the ratio is what the issue asks for."""
    runner = torch.compile(model) if args.compile else model
    opt = make_optimizer(model, device)
    model.train()

    def step(x, y):
        train_step(runner, opt, x, y, device)

    def touch(x, y):  # the loader alone: make sure the batch really arrived on the device
        x.sum()

    result = {"case": name, "batch": batch}
    result["model_only_img_s"] = img_per_s(step, synthetic(batch, shape, classes, device), args.warmup, args.steps, device)
    loader = loader_fn()
    result["loader_len"] = len(loader)
    result["loader_only_img_s"] = img_per_s(touch, endless(loader), 1, args.steps, device)
    result["end_to_end_img_s"] = img_per_s(step, endless(loader), args.warmup, args.steps, device)
    # model-only again: if the two disagree, the machine drifted and the ratio is that uncertain
    result["model_only_after_img_s"] = img_per_s(step, synthetic(batch, shape, classes, device), 2, args.steps, device)
    model_only = (result["model_only_img_s"] + result["model_only_after_img_s"]) / 2
    result["ratio"] = result["end_to_end_img_s"] / model_only
    result["model_only_drift"] = abs(result["model_only_img_s"] - result["model_only_after_img_s"]) / model_only
    return result


def compare_shards(args, jpeg_data, jpeg_train, device):
    """Loader-only images/s over whole epochs: the JPEG folder against the same files as tar shards, interleaved."""
    from vit.data.shard_writer import write_shards

    t0 = time.perf_counter()
    written = write_shards(args.dir, args.dir + "_shards", args.per_shard)
    print(f"wrote {written.samples['train']} samples in {len(written.shards['train'])} shards in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    kinds = {"folder": dict(jpeg_data, in_memory=False, decode="workers"),
             "shards": dict(jpeg_data, dataset="webdataset", train_shards=written.pattern("train"))}
    loaders = {k: data.build_loaders(d, jpeg_train, device).train for k, d in kinds.items()}
    rates = {k: [] for k in kinds}
    for r in range(args.rounds + 1):  # round 0 warms the page cache and the workers up, untimed
        for kind, loader in loaders.items():
            loader.set_epoch(r)
            t0, n = time.perf_counter(), 0
            for x, _ in loader:
                n += len(x)
            if r:
                rates[kind].append(n / (time.perf_counter() - t0))
                print(f"round {r} {kind}: {rates[kind][-1]:.1f} images/s ({n} images)", flush=True)
    print("\n| loader | images/s per round | median |\n|---|---|---|")
    for kind, rs in rates.items():
        print(f"| {kind} | {', '.join(f'{v:.0f}' for v in rs)} | {sorted(rs)[len(rs) // 2]:.0f} |")
    return rates


def run(cases, name, fn):
    """Run one case; a failure is recorded and the others go on."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except Exception as e:
        traceback.print_exc()
        result = {"case": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    result["wall_s"] = time.perf_counter() - t0
    cases.append(result)
    torch._dynamo.reset()
    print(json.dumps(result), flush=True)


def main():
    args = parse_args()
    device = torch.device(args.device)
    cpu_threads(device, args.threads)
    jpegs = make_jpeg_folder(args.dir, args.images)  # first: its worker pool forks before CUDA starts
    report = {"env": environment(device), "args": vars(args), "jpegs": jpegs, "cases": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    print(f"JPEG folder {args.dir}: {report['jpegs']}", flush=True)
    defaults = vit_params.defaults()  # build_loaders takes whole sections
    jpeg_data = dict(defaults["data"], dataset="folder", train_dir=args.dir, val_dir=None, val_split=0.0, split_seed=0,
                     image_size=224, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, workers=args.workers)
    jpeg_train = dict(defaults["train"], batch_size=args.batch, seed=0, randaugment=None,
                      random_resized_crop_scale=[0.08, 1.0], hflip=0.5)
    if args.shards:
        report["shards"] = compare_shards(args, jpeg_data, jpeg_train, device)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        return
    for kind in args.loaders:
        def fn(kind=kind):
            torch.manual_seed(0)
            model = build_model("ours", args.model, 224, num_labels=10).to(device)
            loader_params = dict(jpeg_data, in_memory=kind == "tensor", decode="device" if kind == "device" else "workers")
            make = lambda: data.build_loaders(loader_params, jpeg_train, device).train  # noqa: E731
            return pipeline_case(f"jpeg {args.model} {kind}", model, make, args.batch, (3, 224, 224), 10, args, device)
        run(report["cases"], f"jpeg {args.model} {kind}", fn)

    if args.fm_params:
        def fm():
            overrides = [f"train.batch_size={args.fm_batch}"] if args.fm_batch else []
            params = vit_params.load(args.fm_params, overrides)
            fm_data = dict(params["data"], dataset="fashion_mnist", in_memory=True)
            loaders = data.build_loaders(fm_data, params["train"], device)
            torch.manual_seed(0)
            model = Logits(build_trained_model(params, loaders.classes)).to(device)
            shape = (fm_data["channels"], fm_data["image_size"], fm_data["image_size"])
            batch = params["train"]["batch_size"]
            return pipeline_case("fashion_mnist tensor", model, lambda: loaders.train, batch, shape, 10, args, device)
        run(report["cases"], "fashion_mnist tensor", fm)

    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print()
    print(f"{'case':28} {'batch':>5} | {'loader img/s':>12} {'model img/s':>11} {'e2e img/s':>10} {'e2e/model':>9} | note")
    for c in report["cases"]:
        if "error" in c:
            print(f"{c['case']:28} failed: {c['error'][:100]}")
            continue
        model_only = (c["model_only_img_s"] + c["model_only_after_img_s"]) / 2
        note = f"model-only drifted {100 * c['model_only_drift']:.0f}% between before and after" if c["model_only_drift"] > 0.05 else ""
        print(f"{c['case']:28} {c['batch']:5d} | {c['loader_only_img_s']:12.1f} {model_only:11.1f} "
              f"{c['end_to_end_img_s']:10.1f} {c['ratio']:9.2f} | {note}")
    print(f"target (issue 4): e2e/model >= 0.90 for the JPEG workers or device path on a 16-core machine; wrote {args.out}")


if __name__ == "__main__":
    main()
