"""Helpers for the fault tests (no tests here): tiny params and folders, and a `main.py` runner that
can kill or signal itself at an exact point.

Run as a script, this file is `python main.py` with fault hooks installed from the environment:

    FAULTS_AT="step:5"      the 5th optimizer step of this process (counted across epochs)
    FAULTS_AT="eval:2"      the 2nd forward pass in eval mode
    FAULTS_AT="save:3"      the 3rd torch.save: half the bytes reach the temp file, then the fault
    FAULTS_AT="replace:2"   the 2nd os.replace (checkpoint, metrics or HF folder), just before it
    FAULTS_AT="history:2"   the 2nd metrics.jsonl rewrite, just before it
    FAULTS_ACTION=KILL|INT|TERM   SIGKILL (default), or a SIGINT/SIGTERM sent to itself
    FAULTS_ACTION=ENOSPC    raise OSError(ENOSPC) there, as a full disk does
    FAULTS_ACTION=WAIT      write FAULTS_MARKER, then wait (up to 20 s) for the parent to signal us
                            and write FAULTS_MARKER + ".ack": a real signal from outside, still exact
    FAULTS_NAN_AT=k         the k-th training forward returns NaN logits

Self-inflicted faults land at the same instruction every time, so the kill tests are deterministic;
each test also adds a few kills from the parent after seeded random delays.
"""

import errno
import io
import json
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Optional

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = []  # (group, what, n) of every fault case that passed; totals printed at exit
LOST = []  # resumed runs that did not match the uninterrupted one (a test failed with it)


# -----------------------------------------------------------------------------
# tiny inputs


# the training tests' folder, with more images per class so kills can land at many steps
make_folder = partial(helpers.make_folder, per_class=16)


def tiny_params(folder, out_dir, data=None, **train):
    """A valid params dict: a 2-layer width-32 ViT on `folder` at 16x16, 2 epochs of fp32 on the CPU
    (`data` and `train` change keys of those sections)."""
    return {
        "model": {"patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "intermediate_size": 64, "hidden_dropout_prob": 0.1},
        "data": {"dataset": "folder", "train_dir": str(folder), "val_split": 0.25, "image_size": 16,
                 "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "workers": 0, **(data or {})},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 1, "precision": "fp32",
                  "drop_path": 0.1, **train},
        "output": {"dir": str(out_dir), "misclassified": 4},
    }


def tiny_model(**config):
    """A 2-layer width-32 ViT classifier for 16x16 RGB images with classes a, b, c (`config` changes fields)."""
    import torch

    from vit import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
              patch_size=4, num_channels=3, num_labels=3, layer_norm_eps=1e-6, id2label={0: "a", 1: "b", 2: "c"})
    return ViTForImageClassification(ViTConfig(**{**kw, **config}))


def write_params(path, params):
    with open(path, "w") as f:
        json.dump(params, f)
    return str(path)


@contextmanager
def small_disk(size):
    """A real tmpfs of `size` bytes, yielded as a folder any process of this user can write to; or
    None (with the reason) where this machine cannot mount one.

    A helper process mounts it in a mount namespace of its own (`unshare --user --map-root-user
    --mount`: no root needed where the kernel allows user namespaces; as root, a plain `unshare
    --mount` too) and sleeps; the folder is seen through /proc/<helper>/root. Killing the helper
    unmounts it, and nothing leaks into the machine's own mounts.
    """
    mount_point = tempfile.mkdtemp(prefix="faults_tmpfs_")
    script = f"mount -t tmpfs -o size={int(size)} tmpfs {shlex.quote(mount_point)} && echo mounted && exec sleep 600"
    tries = [["unshare", "--user", "--map-root-user", "--mount"]] + ([["unshare", "--mount"]] if os.geteuid() == 0 else [])
    helper, reasons = None, []
    for prefix in tries:
        try:
            p = subprocess.Popen([*prefix, "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:  # no unshare binary
            reasons.append(f"{' '.join(prefix)}: {e}")
            break
        if p.stdout.readline().strip() == "mounted":  # EOF at once when the mount fails: no hang
            helper = p
            break
        p.wait()
        reasons.append(f"{' '.join(prefix)}: {p.stderr.read().strip()[:200]}")
    try:
        yield (f"/proc/{helper.pid}/root{mount_point}", None) if helper else (None, "; ".join(reasons))
    finally:
        if helper is not None:
            helper.kill()
            helper.wait()
            helper.stdout.close()
            helper.stderr.close()
        os.rmdir(mount_point)


# -----------------------------------------------------------------------------
# running main.py


def env_for(**faults):
    """One intra-op thread (2 shared CI cores), no fault hooks unless given, as environment variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULTS_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    env.update({f"FAULTS_{k.upper()}": str(v) for k, v in faults.items()})
    return env


def run_cli(args, timeout=120, **faults):
    """The real thing: `python main.py *args` (through this file, for the hooks) in a new interpreter."""
    return subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env_for(**faults),
                          capture_output=True, text=True, timeout=timeout)


@dataclass
class Result:
    """What a finished run left: like subprocess.CompletedProcess (returncode -9 after SIGKILL), and the
    process's peak resident memory in MB (None when it was killed before it could say)."""

    returncode: int
    stdout: str
    stderr: str
    max_rss_mb: Optional[float] = None


class Child:
    """`python main.py *args` as a process forked from a server that already imported torch and the project.

    A fresh interpreter costs ~6 s of CPU in imports; a fork costs milliseconds, and it is still a
    real process: its own signals, SIGKILL, exit code, and stdout/stderr (sent to files here).
    """

    _count = 0

    def __init__(self, args, log_dir, cwd=ROOT, env=None, **faults):
        Child._count += 1
        base = os.path.join(str(log_dir), f"run{Child._count}")
        self.out_path, self.err_path, self.rss_path = base + ".out", base + ".err", base + ".rss"
        self.args = list(args)
        self.process = _context().Process(target=_child_main, args=(self.args, faults, self.out_path, self.err_path,
                                                                    self.rss_path, str(cwd), env or {}))
        self.process.start()
        self.pid = self.process.pid

    def signal(self, signum):
        os.kill(self.pid, signum)

    def wait(self, timeout=120):
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise AssertionError(f"main.py {' '.join(self.args)} did not finish in {timeout} s")
        with open(self.out_path) as f, open(self.err_path) as g:
            out, err = f.read(), g.read()
        rss = None
        if os.path.exists(self.rss_path):
            with open(self.rss_path) as f:
                rss = float(f.read())
        return Result(self.process.exitcode, out, err, rss)


def run(args, log_dir, timeout=120, cwd=ROOT, **faults):
    """Start a Child (in the folder `cwd`) and wait for it."""
    return Child(args, log_dir, cwd, **faults).wait(timeout)


_CTX = []


def _context():
    """The forkserver, preloaded once per test session with everything main.py imports."""
    if not _CTX:
        ctx = multiprocessing.get_context("forkserver")
        # (torch.utils.tensorboard where the tensorboard package is installed: the server skips what fails to import)
        ctx.set_forkserver_preload(["faults_util", "vit.cli", "vit.commands", "vit.train.loop", "vit.loading.load",
                                    "timm.data", "safetensors.torch", "torch.utils.tensorboard"])
        _CTX.append(ctx)
    return _CTX[0]


def _child_main(args, faults, out_path, err_path, rss_path, cwd, env):
    """In the forked process: point fds 1 and 2 at files, install the hooks, set `env` (RANK, WORLD_SIZE,
    MASTER_PORT... for one of several processes of a distributed run), run the command line's main in
    the folder `cwd`, write the peak memory, exit with its code."""
    for fd, path in ((1, out_path), (2, err_path)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    for k in [k for k in os.environ if k.startswith("FAULTS_")]:
        del os.environ[k]
    os.environ.update(env_for(**faults))
    os.environ.update(env)
    code = 1
    try:
        import threading

        import torch
        from tqdm import tqdm

        torch.set_num_threads(1)
        tqdm.set_lock(threading.RLock())  # its default is a multiprocessing semaphore, leaked by os._exit
        os.chdir(cwd)
        code = _install_hooks().main(list(args))
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # what an uncaught exception does to `python main.py`: a traceback, exit 1
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # what a normal exit does and os._exit skips: stop the command's DataLoader workers. Left running, they
    # outlive the run with the fork server that started them (and the resource tracker), idle for ever
    for worker in multiprocessing.active_children():
        worker.terminate()
        worker.join()
    import resource

    with open(rss_path, "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))  # KB on Linux
    os._exit(code or 0)


@contextmanager
def deadline(seconds):
    """Raise TimeoutError in this process after `seconds` (SIGALRM): an in-process call that hangs, on a
    FIFO say, fails its test instead of stalling the suite (a blocking open() is interrupted too)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


MAX_RSS_MB = 1500  # a forked child starts near 450 MB (torch and the project preloaded); a blow-up passes this


def assert_bounded(proc):
    """The process's peak memory stayed under MAX_RSS_MB: nothing was allocated from a file's say-so."""
    rss = getattr(proc, "max_rss_mb", None)  # run_cli's CompletedProcess does not measure it
    assert rss is None or rss < MAX_RSS_MB, f"peak memory {rss:.0f} MB"


def assert_clean_refusal(proc, *words):
    """Exit 2, one `error: ...` sentence naming `words` on stderr, no traceback anywhere, bounded memory."""
    assert_bounded(proc)
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def load_state(path):
    """The weights of a training checkpoint, read safely: {"model": tensors} plus "model_ema" when the run keeps an EMA."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k: ckpt[k] for k in ("model", "model_ema") if k in ckpt}


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


_REFERENCES = {}


def reference(folder, tmp, epochs, data=None, **train):
    """The uninterrupted tiny run on `folder` (made by make_folder), with `data` and `train` keys changed:
    last.pt weights (and EMA weights) and metrics lines.

    Cached per epoch count and keys for the session: paths differ between callers, results do not.
    """
    key = (epochs, *sorted((data or {}).items()), *sorted(train.items()))
    if key not in _REFERENCES:
        run_dir = os.path.join(str(tmp), "reference_run")
        params = write_params(os.path.join(str(tmp), "reference.json"), tiny_params(folder, run_dir, data, epochs=epochs, **train))
        r = run(["--params", params], tmp)
        assert r.returncode == 0, r.stderr[-3000:]
        _REFERENCES[key] = {"state": load_state(os.path.join(run_dir, "last.pt")), "metrics": read_metrics(run_dir),
                            "last_bytes": os.path.getsize(os.path.join(run_dir, "last.pt"))}
    return _REFERENCES[key]


_FINISHED = []


def finished_run(tmp):
    """A finished 1-epoch tiny run on a folder made by make_folder, shared by the session (built in
    `tmp` on first use): (its folder, params path, run folder, its stdout). Tests change copies only."""
    if not _FINISHED:
        make_folder(os.path.join(str(tmp), "data"))
        params = write_params(os.path.join(str(tmp), "params.json"),
                              tiny_params(os.path.join(str(tmp), "data"), os.path.join(str(tmp), "run"), epochs=1))
        r = run(["--params", params], tmp)
        assert r.returncode == 0, r.stderr[-3000:]
        _FINISHED.append((tmp, params, os.path.join(str(tmp), "run"), r.stdout))
    return _FINISHED[0]


def copy_run(finished, dest, edit=None):
    """The finished run's last.pt (changed in place by `edit(checkpoint dict)`) in dest/run, and a params
    file like the run's whose output.dir points there."""
    import torch

    _, params, run_dir, _ = finished
    ckpt = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)
    if edit:
        edit(ckpt)
    os.makedirs(os.path.join(str(dest), "run"))
    torch.save(ckpt, os.path.join(str(dest), "run", "last.pt"))
    with open(params) as f:
        p = json.load(f)
    p["output"]["dir"] = os.path.join(str(dest), "run")
    return write_params(os.path.join(str(dest), "params.json"), p)


def assert_same_as(ref, run_dir, tag):
    """Bit-exact weights (and EMA weights), and metrics.jsonl with exactly one line per epoch holding the reference's numbers."""
    try:
        _compare(ref, run_dir, tag)
    except AssertionError:
        LOST.append(tag)
        raise
    SUMMARY.append(("exact", "resumed runs equal to the uninterrupted one", 1))


TIMINGS = {"images_per_s", "epoch_s", "elapsed_s"}  # metrics.jsonl keys that measure the machine, not the run


def _compare(ref, run_dir, tag):
    import torch

    state = load_state(os.path.join(run_dir, "last.pt"))
    assert state.keys() == ref["state"].keys(), f"{tag}: {sorted(state)} != {sorted(ref['state'])}"
    for weights, tensors in state.items():
        want = ref["state"][weights]
        assert tensors.keys() == want.keys()
        diff = {k: (v - want[k]).abs().max().item() for k, v in tensors.items() if not torch.equal(v, want[k])}
        assert not diff, f"{tag}: {weights} weights differ from the uninterrupted run: {diff}"
    metrics = read_metrics(run_dir)
    epochs = len(ref["metrics"])
    assert [h["epoch"] for h in metrics] == list(range(1, epochs + 1)), f"{tag}: {[h['epoch'] for h in metrics]}"
    for got, want in zip(metrics, ref["metrics"]):
        for key in want.keys() - TIMINGS:
            assert got[key] == want[key], f"{tag}: epoch {want['epoch']} {key} {got[key]} != {want[key]}"


def record(group, what, n):
    """Count a passed fault case for the reliability summary, and print it (visible with pytest -s)."""
    SUMMARY.append((group, what, n))
    print(f"\nFAULTS {group}: {what} = {n}")


def summary_line():
    """The README's reliability figures, or None when no fault test ran (printed by conftest.py)."""
    if not SUMMARY:
        return None
    total = {}
    for group, what, n in SUMMARY:
        total[group] = total.get(group, 0) + n
    bad_images = sum(n for g, w, n in SUMMARY if g == "images" and w.startswith("bad"))
    return (f"FAULTS SUMMARY: kills survived {total.get('kill', 0)}, signals tested {total.get('signals', 0)}, "
            f"bad images tried {bad_images}, bad checkpoints refused {total.get('checkpoints', 0)}, "
            f"params cases {total.get('params', 0)}, disk/NaN faults {total.get('disk', 0)}, "
            f"real full disks {total.get('fulldisk', 0)}, thin images {total.get('thin', 0)}, "
            f"special files {total.get('special', 0)}, foreign values {total.get('values', 0)}, "
            f"npz headers {total.get('npz', 0)}, odd names {total.get('names', 0)}, "
            f"late-failing params {total.get('late', 0)}, signals in the last epoch's tail {total.get('tail', 0)}, "
            f"everyday mistakes {total.get('mistakes', 0)}, newcomer's path {total.get('newcomer', 0)}, "
            f"bounds before work {total.get('bounds', 0)}, signals per command and at start-up {total.get('interrupts', 0)}, "
            f"resumed runs bit-exact {total.get('exact', 0)}, data lost {len(LOST)}")


# -----------------------------------------------------------------------------
# the hooks, installed only when this file runs as a script


class _Fault:
    """Count events of one kind; at the chosen one, do the chosen thing."""

    def __init__(self):
        spec = os.environ.get("FAULTS_AT", "")
        self.kind, _, n = spec.partition(":")
        self.n = int(n or 0)
        self.action = os.environ.get("FAULTS_ACTION", "KILL")
        self.counts = {}

    def hit(self, kind):
        """True once: at the n-th event of our kind."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return kind == self.kind and self.counts[kind] == self.n

    def fire(self):
        sys.stdout.flush()
        sys.stderr.flush()
        if self.action == "KILL":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif self.action == "WAIT":
            marker = os.environ["FAULTS_MARKER"]
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            deadline = time.time() + 20
            while not os.path.exists(marker + ".ack") and time.time() < deadline:
                time.sleep(0.01)  # the parent's signal interrupts this sleep and runs main's handler
        else:
            os.kill(os.getpid(), getattr(signal, "SIG" + self.action))


def _install_hooks():
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from vit import cli, precision
    from vit.train import checkpoint, loop
    from vit.model import ViTForImageClassification

    fault = _Fault()
    real_save, real_replace, real_history = torch.save, os.replace, loop.write_history

    def save(obj, f, *a, **kw):
        if fault.hit("save"):  # a torn write: half the bytes, then the fault
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            fault.fire()
        return real_save(obj, f, *a, **kw)

    def replace(src, dst, *a, **kw):
        if fault.hit("replace"):
            fault.fire()
        return real_replace(src, dst, *a, **kw)

    def write_history(path, history):
        if fault.hit("history"):
            fault.fire()
        return real_history(path, history)

    def step_hook(optimizer, args, kwargs):
        if fault.hit("step"):
            fault.fire()

    nan_at = int(os.environ.get("FAULTS_NAN_AT", 0))
    real_forward, real_probe = ViTForImageClassification.forward, precision.interleaved_steps
    forwards = {"train": 0, "probing": False}

    def probe(*a, **kw):  # the start-up's timed steps on a copy of the model are no training forwards
        forwards["probing"] = True
        try:
            return real_probe(*a, **kw)
        finally:
            forwards["probing"] = False

    def forward(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if forwards["probing"]:
            return out
        if self.training:
            forwards["train"] += 1
            if forwards["train"] == nan_at:
                out.logits = out.logits * float("nan")
        elif fault.hit("eval"):
            fault.fire()
        return out

    torch.save = save
    os.replace = replace
    loop.write_history = write_history
    register_optimizer_step_post_hook(step_hook)
    ViTForImageClassification.forward = forward
    precision.interleaved_steps = probe
    assert checkpoint.torch is torch  # checkpoint.save reaches torch.save through the module
    return cli


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(_install_hooks().main(sys.argv[1:]))
