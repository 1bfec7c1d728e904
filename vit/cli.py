"""The command line: `vit`, `python -m vit` and `python main.py` all run `main` here.

    vit                                             # train what params.json says
    vit --params configs/cpu_smoke.json --set train.epochs=3 train.batch_size=64
    vit --resume                                    # continue the run in output.dir
    vit init [DIR]                                  # a starter params.json and configs/, to train in any folder
    vit eval --checkpoint runs/fashion_mnist [--data-dir D] [--out results.json]
    vit predict --checkpoint runs/fashion_mnist/best.pt img1.png img2.jpg --topk 5
    vit predict --checkpoint C folder/ --out preds.csv [--batch-size 32] [--output logits] [--int8]
    vit attention --checkpoint C img1.png ... [--out DIR]
    vit inspect --checkpoint C [--data-dir D] [--out DIR]
    vit features --checkpoint C img.png folder/ ... --out feats.npy   # pooled embeddings, file order in feats.txt
    vit export --checkpoint C --format onnx --out model.onnx        # dynamic batch, checked with onnxruntime
    vit export --checkpoint C --out model_int8.onnx --quantize int8 --images folder/   # + its top-1 agreement
    vit runs [DIR ...] [--csv runs.csv]             # the runs in runs/ side by side: best val_acc, state, what differs
    vit shards SOURCE --out DIR [--per-shard N]     # an image folder or fashion-mnist as webdataset tar shards
    torchrun --nproc_per_node=2 main.py ...         # DDP, same results layout

Training lives in vit/train/loop.py, export in vit/export.py, predict in vit/predict.py, the table of
runs in vit/runs.py, the shards writer in vit/data/shard_writer.py, the other commands in vit/commands.py;
`--ema` makes any command that loads a checkpoint take its EMA weights. This file parses the
arguments, dispatches, turns a UserError into one `error: ...` line and exit code 2, and prints
what the library logs on the `vit` logger (the load report, assumed normalization) while a command runs.
"""

import os

# OpenMP threads that spin while they wait stall when another process shares the cores (a 2-core
# CPU with two busy neighbours ran 12x slower); waiting passively costs ~7% on an idle machine.
# libgomp reads this once, when torch loads it: so here, before anything imports torch (vit/__init__.py
# imports no torch). A user's setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from vit.errors import PeerLost, UserError  # noqa: E402
from vit.schema import DEVICES  # noqa: E402  (plain Python: --help still loads no torch)

COMMANDS = ("train", "init", "eval", "predict", "attention", "inspect", "features", "export", "runs", "shards")
DEFAULT_PARAMS = "params.json"
# what a signal leaves, per command: one line, true at any moment of it
STOPPED = {
    "starting": "stopped by {signal} while starting; nothing was written",
    "train": "training stopped by {signal} without saving; the last saved checkpoint is kept as it was",
}
WROTE = "{command} stopped by {signal}; every file it wrote is whole, none is half-written"  # the other commands (eval writes --out)


def main(argv=None, launched=None):
    """Run one command; returns its exit code. `launched` is when the process started (a training
    run's elapsed_s counts from it), else now. Without `argv` the process's own arguments are read,
    and the commands it suggests start the way it was started; with them, as `python main.py`."""
    for stream in (sys.stdout, sys.stderr):  # names from the file system may hold bytes no encoding can print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    with Interrupts() as interrupts:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        args.launched = time.perf_counter() if launched is None else launched
        args.launcher = launcher() if argv is None else ("python", "main.py")
        try:
            with library_notices():
                module = importlib.import_module(args.module)  # torch and the rest: still "starting"
                interrupts.phase = args.command
                return args.run(module, args)
        except PeerLost as e:  # every surviving rank says it: rank 0, whose lines alone print, may be the one gone
            sys.stderr.write(f"error: {e}\n")
            return 2
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # a signal outside training's own stop (or a second one during it)
            signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
            print(interrupts.line(signum), file=sys.stderr)
            return 128 + signum


class Interrupts:
    """SIGINT and SIGTERM while a command runs: one line that fits the command, and exit 128 + signal.

    The handler raises KeyboardInterrupt(signum), which main turns into that line, except inside an
    import: a KeyboardInterrupt there leaves modules half-made, which some libraries catch and go on
    with (numpy without `matrix`, a signal swallowed whole), so there it prints the line and ends the
    process at once. Training installs its own handlers for its epochs (save, then stop) and passes a
    second signal on to these. A forked DataLoader worker gets torch's plain KeyboardInterrupt.
    Outside the main thread (where Python allows no handlers) nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.phase, self.pid, self.previous = "starting", os.getpid(), {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if os.getpid() == self.pid and _importing(frame):
            print(self.line(signum), file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)
        raise KeyboardInterrupt(signum)

    def line(self, signum):
        words = dict(command=self.phase, signal=signal.Signals(signum).name)
        return STOPPED.get(self.phase, WROTE).format(**words) + "."


def _importing(frame):
    """Whether an import is running in `frame` or below it on the stack."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class PrintHandler(logging.Handler):
    """A library notice as the command line shows it: the message alone, printed to stdout beside the
    command's own lines (through print, so under torchrun only rank 0 shows it)."""

    def emit(self, record):
        print(self.format(record))


@contextmanager
def library_notices():
    """While a command runs, the `vit` logger's info and warnings are printed by a PrintHandler, and
    only there; afterwards the logger is as it was (a library user's own settings included)."""
    logger = logging.getLogger("vit")
    handler, level, propagate = PrintHandler(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def parse_args(argv):
    if not argv or argv[0] not in {*COMMANDS, "-h", "--help"}:
        argv = ["train", *argv]  # plain `vit [--params ...]` trains
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: one subparser per command, every option with its help."""
    parser = argparse.ArgumentParser(
        prog=_prog(), description="Train and use a Vision Transformer. Without a command it trains: "
        f"`{_prog()} [--params FILE] [--set KEY=VALUE ...] [--resume]`.")
    _train_options(parser.add_argument_group("training, the default command"))  # shown by --help; `train` parses them
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (default: train)")
    p = sub.add_parser("train", help="train what params.json describes (the default command)")
    _train_options(p)
    p.set_defaults(module="vit.train.loop", run=_train)
    p = sub.add_parser("init", help="write a starter params.json and configs/ into a folder, to train outside this checkout")
    p.add_argument("folder", nargs="?", default=".", help="where to write them (default: here); created inside an existing folder")
    p.set_defaults(module="vit.starter", run=_init)
    p = sub.add_parser("eval", help="evaluate a checkpoint on a folder or the run's val data")
    _checkpoint_args(p)
    p.add_argument("--data-dir", default=None, help="folder of class folders (default: the run's own val data)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: the run's train.batch_size)")
    p.add_argument("--workers", type=int, default=None, help="processes decoding images (default: the run's data.workers, at most the CPU count)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the metrics, per-class accuracy and confusion matrix there")
    _device_arg(p)
    p.set_defaults(module="vit.commands", run=_eval)
    p = sub.add_parser("predict", help="top-k classes for images")
    _checkpoint_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, and folders whose images are read")
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--out", default=None, help="write the predictions to this .csv or .json (timm's columns) instead of printing them")
    p.add_argument("--output", choices=["probs", "logits"], default="probs", help="the top-k values: softmax probabilities or raw logits")
    p.add_argument("--int8", action="store_true", help="run torch's dynamic int8 quantization on the CPU, and print its top-1 agreement with float32")
    _device_arg(p)
    p.set_defaults(module="vit.predict", run=_predict)
    p = sub.add_parser("attention", help="attention-rollout maps for images")
    _checkpoint_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, and folders whose images are read")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: attention/ beside the checkpoint)")
    _device_arg(p)
    p.set_defaults(module="vit.commands", run=_attention)
    p = sub.add_parser("inspect", help="the ViT paper's Figure 7 panels")
    _checkpoint_args(p)
    p.add_argument("--data-dir", default=None, help="images for the attention distance (default: the Fashion-MNIST test set "
                   "for a Fashion-MNIST checkpoint, else that figure is skipped)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: inspect/ beside the checkpoint)")
    _device_arg(p)
    p.set_defaults(module="vit.commands", run=_inspect)
    p = sub.add_parser("features", help="pooled embeddings (what the head sees) of images, as .npy")
    _checkpoint_args(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, and folders searched for images")
    p.add_argument("--out", required=True, help="the .npy to write, in an existing folder; the file order goes beside it as .txt")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    _device_arg(p)
    p.set_defaults(module="vit.commands", run=_features)
    p = sub.add_parser("export", help="export to ONNX with a dynamic batch, checked against PyTorch with onnxruntime")
    _checkpoint_args(p)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the format to write (onnx, the only one)")
    p.add_argument("--out", required=True, help="the .onnx file to write, in an existing folder")
    p.add_argument("--image-size", type=int, default=None, help="a fixed input size (default: the checkpoint's)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="write onnxruntime's dynamic int8 quantization of the checked graph (CPU inference)")
    p.add_argument("--images", nargs="+", default=[], metavar="IMAGE_OR_FOLDER",
                   help="with --quantize: images to measure int8's top-1 agreement with float32 on")
    p.set_defaults(module="vit.export", run=_export)
    p = sub.add_parser("runs", help="a table of training runs: epochs, best val_acc, time, state, the params that differ")
    p.add_argument("dirs", nargs="*", default=["runs"], metavar="DIR", help="run folders, or folders of them (default runs/)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table there as CSV")
    p.set_defaults(module="vit.runs", run=_runs)
    p = sub.add_parser("shards", help="write an image folder or fashion-mnist as webdataset tar shards (data.dataset webdataset)")
    p.add_argument("source", metavar="SOURCE", help="an image folder (class sub-folders, or train/ and val/ holding them) or fashion-mnist")
    p.add_argument("--out", required=True, help="the folder for train-000000.tar ..., val-... and shards.json")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.set_defaults(module="vit.data.shard_writer", run=_shards)
    return parser


def _train_options(p):
    p.add_argument("--params", default=DEFAULT_PARAMS, metavar="FILE", help=f"the params file (default {DEFAULT_PARAMS}; "
                   "`init` writes one)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="change keys of the params file, e.g. --set train.epochs=3 data.workers=2 (may be repeated)")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its last.pt")


def _checkpoint_args(p):
    p.add_argument("--checkpoint", required=True, help="a run folder, a .pt of a run, an HF folder, a timm file or a Google .npz")
    p.add_argument("--ema", action="store_true", help="take the file's EMA weights (model_ema / state_dict_ema)")


def _device_arg(p):
    p.add_argument("--device", choices=DEVICES, default="auto", help="where the model runs (default auto: cuda, then mps, then cpu)")


def launcher():
    """The words that started this process, for the commands it suggests: `torchrun ... main.py`,
    `python3 main.py`, `python3 -m vit` or `vit`."""
    python, script = (sys.orig_argv or ["python"])[0], sys.argv[0] if sys.argv else "main.py"
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: the command typed was torchrun's, our parent's
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                words = os.fsdecode(f.read()).split("\0")[:-1]
        except OSError:
            words = []
        return torchrun_words(words, script, os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if os.path.basename(script) == "__main__.py":
        return (python, "-m", "vit")
    return (python, script) if script.endswith(".py") else (os.path.basename(script),)


def torchrun_words(parent, script, local_world_size):
    """torchrun's words in its own command line `parent` (from `torchrun`, or the python before
    `-m torch.distributed.run`, through the training script), else the plain form with the process count."""
    start = next((i for i, w in enumerate(parent) if os.path.basename(w) == "torchrun"), None)
    if start is None:
        start = next((i - 1 for i, w in enumerate(parent[1:-1], 1) if w == "-m" and parent[i + 1] == "torch.distributed.run"), None)
    end = next((i for i, w in enumerate(parent) if w == script), None)
    if start is None or end is None or end <= start:
        return ("torchrun", f"--nproc_per_node={local_world_size}", script)
    words = parent[start:end + 1]
    return ("torchrun", *words[1:]) if os.path.basename(words[0]) == "torchrun" else tuple(words)


def _prog():
    """What the user typed: `python -m vit`, `main.py` or `vit`."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "vit"
    return "python -m vit" if name == "__main__.py" else name


# -----------------------------------------------------------------------------
# dispatch: main imports each command's module (so `--help` loads no torch) and passes it in; each returns the exit code


def _train(loop, args):
    if args.params == DEFAULT_PARAMS and not os.path.exists(DEFAULT_PARAMS):
        raise UserError(f"there is no {DEFAULT_PARAMS} in {os.getcwd()}; run `{shlex.join([*args.launcher, 'init'])}` to write a "
                        f"starter {DEFAULT_PARAMS} and configs/ here, or pass --params FILE.")
    return loop.train(args.params, args.set, args.resume, args.launched, args.launcher)


def _init(starter, args):
    written = starter.init(args.folder)
    print(f"wrote {DEFAULT_PARAMS} (the default run: a small ViT on Fashion-MNIST) and {len(written) - 1} recipes in configs/ "
          f"into {args.folder}; train there with `{shlex.join(args.launcher)}`, or in seconds with "
          f"`{shlex.join([*args.launcher, '--params', 'configs/cpu_smoke.json'])}`")
    return 0


def _eval(commands, args):
    return commands.evaluate(args.checkpoint, args.data_dir, args.batch_size, args.workers, args.ema, args.out, args.device)


def _predict(predict, args):
    return predict.predict(args.checkpoint, args.images, args.topk, args.ema, args.batch_size, args.out, args.output,
                           args.int8, args.device)


def _attention(commands, args):
    return commands.attention(args.checkpoint, args.images, args.out, args.device, args.ema)


def _inspect(commands, args):
    commands.inspect(args.checkpoint, args.data_dir, args.out, args.device, args.ema)
    return 0


def _features(commands, args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be 1 or more.")
    return commands.features(args.checkpoint, args.inputs, args.out, args.batch_size, args.ema, args.device)


def _export(export, args):
    export.export_onnx(args.checkpoint, args.out, args.image_size, args.ema, args.quantize, args.images)
    return 0


def _runs(runs, args):
    return runs.runs(args.dirs, args.csv)


def _shards(shard_writer, args):
    w = shard_writer.write_shards(args.source, args.out, args.per_shard)
    if w.skipped:
        print(f"skipped {len(w.skipped)} file(s) that are not usable images, e.g. {w.skipped[0]}")
    split_words = [f"{w.samples[s]:,} {s} samples in {len(w.shards[s])} shard(s)" for s in w.shards]
    print(f"wrote {' and '.join(split_words)} to {w.out}, {len(w.classes)} classes in {w.out}/shards.json")
    sets = ["data.dataset=webdataset", f"data.train_shards={w.pattern('train')}"]
    sets += [f"data.val_shards={w.pattern('val')}"] if "val" in w.shards else []
    print("train on them with these params (data.image_size, channels, mean and std as for the source):")
    print("  " + json.dumps({"dataset": "webdataset", "train_shards": w.pattern("train"),
                             "val_shards": w.pattern("val") if "val" in w.shards else None,
                             "train_samples": w.samples["train"]}))
    print(f"  or: python main.py --set {shlex.join(sets)} data.train_samples={w.samples['train']}")
    return 0
