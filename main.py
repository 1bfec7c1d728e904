"""Train, evaluate and use a Vision Transformer; everything a run does comes from params.json.

    python main.py                                   # train what params.json says
    python main.py --params configs/cpu_smoke.json --set train.epochs=3 train.batch_size=64
    python main.py --resume                          # continue the run in output.dir
    python main.py eval --checkpoint runs/fashion_mnist [--data-dir D]
    python main.py predict --checkpoint runs/fashion_mnist/best.pt img1.png img2.jpg --topk 5
    python main.py attention --checkpoint C img1.png ... [--out DIR]
    python main.py inspect --checkpoint C [--data-dir D] [--out DIR]
    torchrun --nproc_per_node=2 main.py ...          # DDP, same results layout

This file only sets up (DeiT's main.py): params, processes, data, model, optimizer, resume; then the
epoch loop of train / evaluate / checkpoint / log. The work itself lives in vit/; the commands that
use a finished model (eval, predict, attention, inspect) in vit/commands.py.
"""

import os
import time

LAUNCHED = time.perf_counter()  # elapsed_s in metrics.jsonl counts from here: imports, data, model and compile included
# OpenMP threads that spin while they wait stall when another process shares the cores (a 2-core
# CPU with two busy neighbours ran 12x slower); waiting passively costs ~7% on an idle machine.
# libgomp reads this once, when torch loads it: so here, before the import. A user's setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import functools
import json
import math
import shlex
import signal
import sys

import torch
from tqdm import tqdm

from vit import commands
from vit.train import checkpoint, distributed, engine, optim
from vit.train import params as P
from vit.train import precision as precisions
from vit.errors import UserError
from vit.config import ViTConfig
from vit.model import ViTForImageClassification

# -----------------------------------------------------------------------------
# setup


def build_model(params, classes):
    """The model params.json describes: a preset and/or explicit sizes, or a pretrained source with a new head."""
    m, d, t = params["model"], params["data"], params["train"]
    id2label = dict(enumerate(classes))
    common = dict(image_size=d["image_size"], drop_path_rate=t["drop_path"], hidden_dropout_prob=m["hidden_dropout_prob"],
                  attention_probs_dropout_prob=m["attention_probs_dropout_prob"])
    if m["pretrained"] is not None:
        # an RGB checkpoint on gray data (or the reverse) gets its patch kernel adapted, said in the load report
        return ViTForImageClassification.from_pretrained(
            m["pretrained"], num_labels=len(classes), id2label=id2label, num_channels=d["channels"], **common)
    sizes = {k: m[k] for k in ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "layer_norm_eps", "qkv_bias") if m[k] is not None}
    kw = dict(num_channels=d["channels"], num_labels=len(classes), id2label=id2label, **common, **sizes)
    if m["preset"] is not None:
        config = ViTConfig.from_preset(m["preset"], **kw)
    else:
        config = ViTConfig(**{"layer_norm_eps": 1e-6, **kw})
    return ViTForImageClassification(config)


def write_history(path, history):
    """Rewrite metrics.jsonl atomically from the records the checkpoint carries: one line per
    finished epoch, no duplicate after a resume and no gap after a kill between save and log."""
    checkpoint.atomic_write(path, lambda f: f.writelines(json.dumps(h) + "\n" for h in history), mode="w")


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves at the next optimizer step. A second signal exits at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt  # impatient second Ctrl-C: the last saved checkpoint stays as it is
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the next step, then stopping "
              f"(send it again to stop without saving).", file=sys.stderr)

    def __call__(self):
        return self.signum is not None


def epoch_line(record):
    """`Epoch : 7 - loss : 0.2399 - acc: 0.9014 - val_loss : 0.9127 - val_acc: 0.6396 [- val_top5: ...]`."""
    line = f"Epoch : {record['epoch']} - loss : {record['loss']:.4f} - acc: {record['acc']:.4f}"
    if "val_loss" in record:
        line += f" - val_loss : {record['val_loss']:.4f} - val_acc: {record['val_acc']:.4f}"
    if "val_top5" in record:
        line += f" - val_top5: {record['val_top5']:.4f}"
    return line


# -----------------------------------------------------------------------------
# commands


def train(args):
    """The training run: setup, then the epoch loop (train, evaluate, checkpoint, log), then the report.

    Returns the exit code: 0, or 128 + the signal that asked it to stop.
    """
    from vit import data

    params = P.load(args.params, args.set)
    d = distributed.init()
    t, out, device = params["train"], params["output"]["dir"], d.device
    last_path, best_path = os.path.join(out, checkpoint.LAST), os.path.join(out, checkpoint.BEST)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if args.resume and not os.path.isfile(last_path):
        raise UserError(f"--resume found no checkpoint at {last_path}; start without --resume or set output.dir.")
    if not args.resume and os.path.isfile(last_path):
        raise UserError(f"{out} already holds a run ({last_path}); pass --resume to continue it or set output.dir to a new folder.")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (the loss, the optimizer)
        torch.backends.cudnn.allow_tf32 = True
    engine.seed_epoch(t["seed"], 0, 0)  # model init: the same on every rank (DDP also broadcasts rank 0's)

    loaders = data.build_loaders(params["data"], t, device, d.rank, d.world_size)
    classes, K = loaders.classes, len(loaders.classes)
    model = build_model(params, classes).to(device)  # the plain model: saved, and its parameters optimized
    if t["freeze_backbone"]:
        optim.freeze_backbone(model)
    optimizer = optim.build_optimizer(model, t, device)
    # what a checkpoint resumes from; history is the metrics.jsonl records, saved in every checkpoint;
    # elapsed_s the run's time before this process (a resumed run's clock goes on where it stopped)
    progress = {"epoch": 0, "step": 0, "step_in_epoch": 0, "sums": None, "best_acc": -1.0, "history": [],
                "precision": None, "elapsed_s": 0.0}
    rng, scaler_state = None, None  # RNG state to restore when resuming mid-epoch; the fp16 loss scale
    if args.resume:
        progress, rngs, scaler_state = checkpoint.resume(last_path, model, optimizer)
        # each rank continues its own streams and metric sums (another world size cannot be exact anyway)
        rank = d.rank if d.rank < len(rngs) else 0
        rng = rngs[rank]
        progress["sums"] = progress["sums"][rank] if progress["sums"] else None
        print(f"resuming {last_path}: {progress['epoch']} epoch(s) done"
              + (f", {progress['step_in_epoch']} step(s) into the next" if progress["step_in_epoch"] else ""))
    history = progress["history"]
    sample_shape = (t["batch_size"], params["data"]["channels"], params["data"]["image_size"], params["data"]["image_size"])
    # every rank trains in rank 0's choice (auto times steps, and two ranks could time them differently)
    precision, why = distributed.gather(precisions.resolve(t["precision"], device, model, sample_shape,
                                                           saved=progress["precision"]), d)[0]
    progress["precision"] = precision
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    if scaler_state and scaler.is_enabled():  # empty when saved without fp16: a switch to fp16 starts a fresh scale
        scaler.load_state_dict(scaler_state)
    started = args.launched - progress["elapsed_s"]  # elapsed_s = now - started
    # evaluation runs without DDP (ranks may hold one val batch more or less); training through it
    evaluator = torch.compile(model) if t["compile"] else model
    runner = distributed.wrap(evaluator, d)
    settings = engine.StepSettings.from_params(t, precision)
    eval_kw = dict(num_classes=K, d=d, precision=precision, oom_advice=settings.oom_advice)

    steps_per_epoch = math.ceil(len(loaders.train) / t["grad_accum"])
    base_lr = optim.scaled_lr(t, d.world_size)
    lr_fn = functools.partial(optim.lr_at, base_lr=base_lr, min_lr=t["min_lr"],
                              # a short run (--set train.epochs=3) may be shorter than the warm-up: clip it
                              warmup_steps=min(round(t["warmup_epochs"] * steps_per_epoch), t["epochs"] * steps_per_epoch),
                              total_steps=t["epochs"] * steps_per_epoch)
    mixup_fn = None
    if t["mixup"] > 0 or t["cutmix"] > 0:
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=t["mixup"], cutmix_alpha=t["cutmix"], label_smoothing=t["label_smoothing"], num_classes=K)

    if d.is_main:
        try:
            os.makedirs(out, exist_ok=True)
            P.save(params, os.path.join(out, "params.json"))
            write_history(metrics_path, history)
        except OSError as e:  # output.dir names an existing file, a folder we may not write, a full disk
            raise UserError(f"params key output.dir={out!r} cannot hold the run ({e.strerror}); "
                            f"choose another folder or free space there.") from None
        print(f"{model.num_parameters():,} parameters, {K} classes, {len(loaders.train)} batches/epoch, "
              f"effective batch {t['batch_size'] * t['grad_accum'] * d.world_size}, lr {base_lr:.3g}, "
              f"data {loaders.report.get('loader')}, run folder {out}")
        where = f"the CPU, {precisions.thread_note()}" if device.type == "cpu" else str(device)
        print(f"training on {where}; precision {precision} ({why})")
    again = (["--params", args.params] if args.params != "params.json" else []) + (["--set", *args.set] if args.set else [])
    resume_hint = shlex.join(["python", "main.py", *again, "--resume"])

    def save(path, **extra):
        # rank 0 writes; the others wait so nobody runs ahead of a checkpoint
        progress["elapsed_s"] = time.perf_counter() - started
        rngs = distributed.gather(checkpoint.rng_state(), d)
        if d.is_main:
            payload = checkpoint.training_payload(model, optimizer, scaler, {**progress, **extra}, params,
                                                  classes, loaders.mean, loaders.std, rngs)
            checkpoint.save(path, payload)
        distributed.barrier(d)

    from vit.viz import plots  # matplotlib loads only once a run really starts

    def announce_cost(rate):  # once per process, a few dozen steps into its first epoch
        if d.is_main and not announced:
            announced.append(rate)
            tqdm.write(cost_line(rate, len(loaders.train) * t["batch_size"] * d.world_size, loaders.report["val_files"],
                                 t["eval_every"], t["epochs"], t["epochs"] - epoch, device, precision))

    code, announced, final_val = 0, [], None
    with StopRequest() as stop:
        for epoch in range(progress["epoch"], t["epochs"]):
            if progress["step_in_epoch"] == 0:
                engine.seed_epoch(t["seed"], epoch, d.rank)
                rng = None
            loaders.train.set_epoch(epoch)
            epoch_start = time.perf_counter()
            try:
                stats = engine.train_one_epoch(
                    runner, loaders.train, optimizer, scaler, lr_fn, epoch, settings=settings, d=d,
                    start=engine.EpochStart(progress["step_in_epoch"], progress["sums"], rng), mixup_fn=mixup_fn,
                    should_stop=stop, backbone=model.vit if t["freeze_backbone"] else None,
                    desc=f"epoch {epoch + 1}/{t['epochs']}", on_rate=announce_cost)
            except engine.NonFiniteLoss as e:
                kept = (f"the last good checkpoint {last_path} ({progress['epoch']} epoch(s)) is intact"
                        if os.path.isfile(last_path) else "no checkpoint was saved yet")
                raise UserError(f"{e}, so training stopped: {kept}; lower train.lr or set train.clip_grad, then resume with --resume.") from None
            progress["step"] = epoch * steps_per_epoch + stats["step_in_epoch"]
            if stats["interrupted"]:
                save(last_path, step_in_epoch=stats["step_in_epoch"], sums=distributed.gather(stats["sums"], d))
                print(f"stopped in epoch {epoch + 1} after {stats['step_in_epoch']}/{steps_per_epoch} steps; "
                      f"saved {last_path}. Resume with: {resume_hint}")
                code = 128 + (stop.signum or signal.SIGINT)
                break

            if not announced:  # an epoch too short to measure mid-way
                announce_cost(stats["images_per_s"])
            record = {"epoch": epoch + 1, "loss": stats["loss"], "acc": stats["acc"]}
            is_last = epoch + 1 == t["epochs"]
            if loaders.val is not None and ((epoch + 1) % t["eval_every"] == 0 or is_last):
                # the last epoch's pass also gathers what the end-of-run report shows
                val = engine.evaluate(evaluator, loaders.val, **eval_kw, **(report_kw(loaders, params) if is_last else {}))
                final_val = val if is_last else None
                record.update({f"val_{k}": v for k, v in val.items() if k in ("loss", "acc", "top5")})
            now = time.perf_counter()  # epoch_s: this epoch's training + evaluation; elapsed_s: since launch
            record.update(lr=stats["lr"], images_per_s=round(stats["images_per_s"], 1), skipped=loaders.train.skipped,
                          epoch_s=round(now - epoch_start, 2), elapsed_s=round(now - started, 2))
            print(epoch_line(record))
            history.append(record)
            progress.update(epoch=epoch + 1, step_in_epoch=0, sums=None)
            is_best = record.get("val_acc", -1.0) > progress["best_acc"]
            if is_best:
                progress["best_acc"] = record["val_acc"]
            stopping = distributed.any_rank(stop(), d)
            # best before last: a kill in between redoes this epoch on resume, which rewrites best identically
            if is_best:
                save(best_path)
                if d.is_main:
                    checkpoint.save_hf(model, os.path.join(out, checkpoint.HF_DIR), loaders.mean, loaders.std)
            if (epoch + 1) % params["output"]["save_every"] == 0 or is_last or stopping:
                save(last_path)
            if d.is_main:
                try:
                    write_history(metrics_path, history)  # after the checkpoint: a line never outlives its epoch's state
                except OSError as e:  # resuming rebuilds metrics.jsonl from the checkpoint's records
                    then = (f"{last_path} is saved, so free space and resume with --resume" if os.path.isfile(last_path)
                            else "no checkpoint was saved yet, so free space and start again")
                    raise UserError(f"could not write {metrics_path} ({e.strerror}); {then}.") from None
                plots.plot_curves(history, os.path.join(out, "curves.png"))
            if stopping:  # after the last epoch too: resuming then only writes the end-of-run report
                print(f"stopped after epoch {epoch + 1}; saved {last_path}. Resume with: {resume_hint}")
                code = 128 + (stop.signum or signal.SIGINT)
                break

    if code == 0 and loaders.val is not None:
        if final_val is None:  # resumed after the last epoch: its evaluation ran in the process that stopped
            final_val = engine.evaluate(evaluator, loaders.val, **eval_kw, **report_kw(loaders, params))
        report(final_val, loaders, out, params["output"]["misclassified"], d)
    if code == 0 and (loaders.report.get("skipped_at_scan") or loaders.report.get("dropped_at_load")):
        print(f"bad files: {loaders.report.get('skipped_at_scan', 0)} skipped at scan, "
              f"{loaders.report.get('dropped_at_load', 0)} dropped at load (see warnings above)")
    if code == 0 and d.is_main:
        print(summary_line(history, time.perf_counter() - started, out))
    distributed.cleanup(d)
    return code


def duration(seconds):
    """'42 s', '3.5 min' or '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def cost_line(rate, train_images, val_images, eval_every, epochs, epochs_left, device, precision):
    """What the run will cost, from the measured training speed: evaluation is a forward pass only,
    about a third of a training step per image."""
    epoch_s = train_images / rate + val_images / (3 * rate) / eval_every
    where = f"CPU ({torch.get_num_threads()} threads, {precision})" if device.type == "cpu" else f"{device} ({precision})"
    left = f" ({duration(epoch_s * epochs_left)} left)" if epochs_left < epochs else ""
    return (f"speed: {rate:,.0f} images/s on the {where}: ≈ {duration(epoch_s)}/epoch with evaluation, "
            f"≈ {duration(epoch_s * epochs)} for {epochs} epochs{left}")


def summary_line(history, elapsed, out):
    """The run's end: time, best val_acc and its epoch, and the files in the run folder."""
    files = [checkpoint.BEST, checkpoint.LAST, checkpoint.HF_DIR + "/", "metrics.jsonl", "curves.png",
             "confusion.png", "per_class_accuracy.json", "misclassified.png", "params.json"]
    present = [f for f in files if os.path.exists(os.path.join(out, f))]
    scored = [h for h in history if "val_acc" in h]
    best = max(scored, key=lambda h: h["val_acc"], default=None)  # the first of equals, as best.pt keeps it
    result = f"best val_acc {best['val_acc']:.4f} at epoch {best['epoch']}" if best else "no validation data"
    return f"done: {len(history)} epochs in {duration(elapsed)}, {result}; in {out}: {', '.join(present)}"


def report_kw(loaders, params):
    """evaluate()'s extra arguments for the end-of-run report: the confusion matrix and misclassified images."""
    from vit import data

    return dict(mistakes=max(params["output"]["misclassified"], 1),
                denormalize=functools.partial(data.denormalize, mean=loaders.mean, std=loaders.std))


def report(val, loaders, out, n_mistakes, d):
    """End of run: confusion matrix, per-class accuracy (json + printed), misclassified grid."""
    from vit.viz import plots

    if not d.is_main:
        return
    classes, matrix = loaders.classes, val["confusion"]
    per_class = {c: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, c in enumerate(classes)}
    with open(os.path.join(out, "per_class_accuracy.json"), "w") as f:
        json.dump(per_class, f, indent=2)
    print("per-class accuracy: " + ", ".join(f"{c} {a:.4f}" for c, a in per_class.items()))
    plots.plot_confusion(matrix, classes, os.path.join(out, "confusion.png"))
    wrong = val["mistakes"][:n_mistakes]
    plots.plot_misclassified([img.numpy() for img, _, _ in wrong], [classes[t] for _, t, _ in wrong],
                             [classes[p] for _, _, p in wrong], os.path.join(out, "misclassified.png"))


# -----------------------------------------------------------------------------
# command line


def run_attention(args):
    commands.attention(args.checkpoint, args.images, args.out)  # the PNGs it writes are printed as it goes
    return 0


def run_inspect(args):
    commands.inspect(args.checkpoint, args.data_dir, args.out)
    return 0


def parse_args(argv):
    names = {"train", "eval", "predict", "attention", "inspect"}
    if not argv or argv[0] not in names | {"-h", "--help"}:
        argv = ["train", *argv]  # plain `python main.py [--params ...]` trains
    parser = argparse.ArgumentParser(description="Train and use a Vision Transformer (see params.json).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train what params.json describes (the default command)")
    p.add_argument("--params", default="params.json", help="params file (default params.json)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override keys, e.g. train.epochs=3")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from last.pt")
    p.set_defaults(fn=train)
    p = sub.add_parser("eval", help="evaluate a checkpoint on a folder or the run's val data")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default=None, help="folder of class folders (default: the run's own val data)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size")
    p.set_defaults(fn=lambda a: commands.evaluate(a.checkpoint, a.data_dir, a.batch_size))
    p = sub.add_parser("predict", help="top-k classes for images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--topk", type=int, default=5)
    p.set_defaults(fn=lambda a: commands.predict(a.checkpoint, a.images, a.topk))
    p = sub.add_parser("attention", help="attention-rollout maps for images")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=run_attention)
    p = sub.add_parser("inspect", help="the ViT paper's Figure 7 panels")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    p.set_defaults(fn=run_inspect)
    return parser.parse_args(argv)


def main(argv=None, launched=None):
    """Run one command; `launched` is when the process started (elapsed_s counts from it), else now."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.launched = time.perf_counter() if launched is None else launched
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while stopping: no new save, the last one stands
        print("interrupted; the last saved checkpoint is kept as it was.", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main(launched=LAUNCHED))
