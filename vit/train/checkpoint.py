"""A run's state on disk: where the run stands (`Progress`), atomic saves of `last.pt` / `best.pt`,
resume, RNG state, and the best model as an HF folder.

A training checkpoint holds only plain types and tensors, so vit/loading/ (the one reader of
weight files, which also turns a run's `best.pt` into a model) reads it with
`torch.load(weights_only=True)`: nothing in the file can execute code. The run folder's file names
are vit/run_folder.py's.
"""

import dataclasses
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from vit.data import Loaders
from vit.errors import UserError
from vit.files import atomic_write
from vit.loading.core import WRAPPER_PREFIXES, strip_prefixes
from vit.loading.project import read_training_checkpoint
from vit.run_folder import LAST


@dataclass
class Progress:
    """Where a run stands: what a checkpoint saves beside the weights and `resume` restores. On disk
    each field is a top-level key of last.pt / best.pt under its own name, except `step`, which is
    `scheduler.step` (the keys of the checkpoints this project has always written)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps so far: the schedule is a pure function of it
    step_in_epoch: int = 0  # optimizer steps done in the interrupted epoch (0 after an epoch's end)
    # that epoch's running metric sums: this rank's {"loss", "correct", "count"} while training, one
    # such dict per rank in the file; None at an epoch's end
    sums: Union[dict, list, None] = None
    best_acc: float = -1.0  # the best output.best_metric so far
    history: list = field(default_factory=list)  # the metrics.jsonl records so far, one per finished epoch
    precision: Optional[str] = None  # what train.precision "auto" chose, kept for the resumed run (None: not yet)
    elapsed_s: float = 0.0  # the run's wall time so far, summed over resumes
    plan: Optional[dict] = None  # the run's length: vit/train/budget.py's Plan.state_dict() (None: not made yet)
    device: Optional[str] = None  # the device type it trained on last ("cpu", "cuda", "mps"; None: not saved)


# -----------------------------------------------------------------------------
# rng state, as tensors and lists so that weights_only loading accepts it


def rng_state(device: torch.device) -> dict:
    """Every random stream a run draws from: the CPU's, the training device's (CUDA or MPS; only that
    device is asked, so a CPU run on a CUDA machine makes no CUDA call), numpy's and Python's."""
    np_state = np.random.get_state()  # ('MT19937', keys (624,) uint32, pos, has_gauss, cached_gaussian)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "mps": torch.mps.get_rng_state() if device.type == "mps" else None,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore `rng_state`'s streams; the device's own only when the state has them for this device type
    (a run resumed on another device says so at start-up, vit/train/loop.py)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("mps") is not None and device.type == "mps":  # checkpoints from before MPS have no "mps"
        torch.mps.set_rng_state(state["mps"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# -----------------------------------------------------------------------------
# saving


def save(path: str, payload: dict) -> None:
    """torch.save through atomic_write; a failure says the previous file is kept and how to go on."""
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except OSError as e:
        raise _write_failed(path, e) from None


def _write_failed(path, e):
    """The one-sentence error for a failed save of `path` (a file or a folder), saying what is left of it."""
    kept = f"the previous {path} is kept intact" if os.path.exists(path) else f"no earlier {path} exists"
    then = "resume with --resume" if os.path.isfile(os.path.join(os.path.dirname(path), LAST)) else "start the run again"
    return UserError(f"could not write checkpoint {path} ({getattr(e, 'strerror', None) or e}); {kept}; free disk space and {then}.")


def training_payload(model: torch.nn.Module, state: tuple[dict, dict], scaler: torch.amp.GradScaler,
                     progress: Progress, command: str, params: dict, loaders: Loaders, rngs: list,
                     ema: Optional[torch.nn.Module] = None, nodes: int = 1) -> dict:
    """Everything `resume` needs, in weights_only-loadable types: `state` the model's and the optimizer's
    state dicts, whole (vit/train/fsdp.py gathers them when the model is sharded), `model` their config,
    `progress` with its sums one per rank,
    `command` what resumes the run, `rngs` every rank's `rng_state()` (a mid-epoch resume continues
    each rank's streams: one per process), the class names and normalization of `loaders`, and `ema`
    the weights' moving average (timm's ModelEmaV3) when the run keeps one, and `nodes` the machines the
    processes ran on."""
    weights, optimizer_state = state
    payload = {
        "model": strip_prefixes(weights, WRAPPER_PREFIXES),
        "config": model.config.to_hf_dict(),
        "optimizer": optimizer_state,
        "scheduler": {"step": progress.step},  # the schedule is a pure function of the step
        "scaler": scaler.state_dict(),
        **{f.name: getattr(progress, f.name) for f in dataclasses.fields(progress) if f.name != "step"},
        "rng": rngs,
        "world_size": len(rngs),  # processes: with batch_size and grad_accum, the effective batch a resume must keep
        "nodes": nodes,  # torchrun's launchers; any count resumes (another world size is exact no more)
        "command": command,  # what resumes this run: how it was launched, plus --resume
        "params": params,
        "classes": list(loaders.classes),
        "mean": list(loaders.mean),
        "std": list(loaders.std),
    }
    if ema is not None:  # under the key DeiT uses; the loader takes it with ema=True (--ema)
        payload["model_ema"] = strip_prefixes(ema.module.state_dict(), WRAPPER_PREFIXES)
    return payload


def save_hf(model: torch.nn.Module, directory: str, mean: list, std: list, weights: Optional[dict] = None) -> None:
    """save_pretrained (+ the normalization as HF's preprocessor_config.json) into a temp folder, then
    swap it in, so `directory` is always whole; `weights` instead of the model's own state dict (a
    sharded model's, gathered).

    A gray (1-channel) model is saved as one that takes RGB, its patch kernel spread over R, G and B by
    PIL's luma weights (vit/resize.py): transformers' image pipelines convert every image to RGB, and
    its processor has no gray option. It computes what the gray model computes on the gray version of
    an image, up to PIL's rounding of gray levels; loading it for gray data sums the kernel back."""
    tmp, old = directory + ".tmp", directory + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(old):  # an earlier save was killed mid-swap: keep the whole copy, drop the other
        if os.path.isdir(directory):
            shutil.rmtree(old)
        else:
            os.replace(old, directory)
    size, gray = model.config.image_size, model.config.num_channels == 1
    if gray:  # the one value for each of R, G and B: HF's processor wants one per channel
        mean, std = list(mean) * 3, list(std) * 3
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
                 "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,  # 3: bicubic, as our eval
                 "image_mean": list(mean), "image_std": list(std)}
    try:
        model.save_pretrained(tmp, num_channels=3 if gray else None, state_dict=weights)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(processor, f, indent=2)
        if os.path.isdir(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.isdir(directory):
            os.replace(old, directory)  # the swap failed halfway: put the previous folder back
        raise _write_failed(directory, e) from None
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# resuming


def resume(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, launch: tuple[int, int, int],
           ema: Optional[torch.nn.Module] = None) -> tuple[Progress, list, dict]:
    """Load a training checkpoint into model, optimizer and the weights' EMA (when the run keeps one);
    returns its Progress (sums still one per rank), the per-rank RNG states and the gradient scaler's
    state (empty unless the run trained in fp16).

    `launch` is this process's (world size, batch_size, grad_accum): their product, the effective batch,
    must be the checkpoint's, or every epoch would have other steps and the schedule another length.
    """
    ckpt = read_training_checkpoint(path)
    check_resumable(ckpt, path)
    check_same_batch(ckpt, path, launch)
    if (ema is not None) != ("model_ema" in ckpt):
        raise UserError(
            f"checkpoint {path} was saved {'with' if 'model_ema' in ckpt else 'without'} an EMA of the weights but "
            f"train.ema_decay is {'null' if ema is None else 'set'} now; resume with the params the run was started with."
        )
    try:
        model.load_state_dict(strip_prefixes(ckpt["model"], WRAPPER_PREFIXES))
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(strip_prefixes(ckpt["model_ema"], WRAPPER_PREFIXES))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(
            f"checkpoint {path} does not fit the model or optimizer built from the current params ({first[:200]}); "
            f"resume with the params the run was started with."
        ) from None
    # checkpoints from before precision, elapsed_s and the plan were saved: the precision is chosen again,
    # the clock starts at 0, and the run's length is train.epochs
    progress = Progress(ckpt["epoch"], ckpt["scheduler"]["step"], ckpt["step_in_epoch"], ckpt["sums"], ckpt["best_acc"],
                        ckpt["history"], ckpt.get("precision"), ckpt.get("elapsed_s", 0.0), ckpt.get("plan"), ckpt.get("device"))
    return progress, ckpt["rng"], ckpt["scaler"]


# what resume reads from last.pt beside the weights, and the types it needs
RESUME_FIELDS = {"optimizer": dict, "scheduler": dict, "scaler": dict, "epoch": int, "step_in_epoch": int,
                 "sums": (list, type(None)), "best_acc": (int, float), "history": list, "rng": list}
RNG_KEYS = {"torch", "cuda", "numpy", "python"}


def check_resumable(ckpt, path):
    """Refuse a last.pt that lacks what resume reads, or holds it in the wrong type, before anything is loaded."""
    def refuse(what):
        return UserError(f"checkpoint {path} {what}, so the run cannot continue from it; it is damaged or not a "
                         f"last.pt of this project: start a new run in another output.dir.")

    for key, types in RESUME_FIELDS.items():
        if key not in ckpt:
            raise refuse(f"lacks {key!r}")
        value = ckpt[key]
        if not isinstance(value, types) or isinstance(value, bool) or (isinstance(value, int) and value < 0):
            raise refuse(f"has {key}={str(value)[:60]!r}")
    step = ckpt["scheduler"].get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise refuse(f"has scheduler step {str(step)[:60]!r}")
    if not ckpt["rng"] or not all(isinstance(r, dict) and RNG_KEYS <= r.keys() for r in ckpt["rng"]):
        raise refuse("has no RNG state per process")
    if not all(isinstance(h, dict) for h in ckpt["history"]) or not all(isinstance(s, dict) for s in ckpt["sums"] or []):
        raise refuse("has metrics records that are not key-value records")
    if "plan" in ckpt and not _is_plan(ckpt["plan"]):
        raise refuse(f"has plan={str(ckpt['plan'])[:60]!r}")


def _is_plan(plan):
    """Whether `plan` has the shape of budget.Plan.state_dict(): counts, a budget, the schedule's totals, notes."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return (isinstance(plan, dict) and count(plan.get("epochs")) and isinstance(plan.get("decided"), bool)
            and (plan.get("budget_s") is None or (isinstance(plan["budget_s"], (int, float)) and math.isfinite(plan["budget_s"])
                                                   and not isinstance(plan["budget_s"], bool)))
            and isinstance(plan.get("totals"), list) and len(plan["totals"]) >= 1
            and all(isinstance(t, list) and len(t) == 2 and all(count(v) for v in t) for t in plan["totals"])
            and isinstance(plan.get("notes"), list) and all(isinstance(n, str) for n in plan["notes"])
            and (plan.get("drop_share") is None or (isinstance(plan["drop_share"], float) and 0.0 < plan["drop_share"] <= 1.0))
            and (plan.get("drop_saving") is None or (isinstance(plan["drop_saving"], float) and 0.0 <= plan["drop_saving"] < 1e3))
            and isinstance(plan.get("revised", True), bool))


def check_same_batch(ckpt, path, launch):
    """Refuse a resume whose world size x batch_size x grad_accum differs from the run's (checkpoints
    from before world_size was saved are not checked)."""
    train = ckpt.get("params", {}).get("train", {}) if isinstance(ckpt.get("params"), dict) else {}
    saved = (ckpt.get("world_size"), train.get("batch_size"), train.get("grad_accum"))
    if not all(isinstance(v, int) for v in saved) or math.prod(saved) == math.prod(launch):
        return
    again = f" ({ckpt['command']})" if isinstance(ckpt.get("command"), str) else ""
    raise UserError(
        f"checkpoint {path} was trained with an effective batch of {math.prod(saved)} ({saved[0]} process(es) x "
        f"batch_size {saved[1]} x grad_accum {saved[2]}) but this launch gives {math.prod(launch)} ({launch[0]} x "
        f"{launch[1]} x {launch[2]}), which changes every epoch's steps and the schedule; resume it the way it was "
        f"started{again}, or set train.batch_size and train.grad_accum so that the product is {math.prod(saved)}."
    )
