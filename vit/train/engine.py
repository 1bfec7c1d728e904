"""One training epoch, returning a dict of averages; DeiT's engine.py (its evaluate is vit/evaluation.py).

The loop: per-iteration lr, AMP (bf16, or fp16 with a GradScaler) on CUDA, gradient accumulation
with DDP syncing only on the last micro-step, clipping, Mixup/CutMix, a tqdm bar on rank 0.
It stops cleanly when asked to (Ctrl-C, SIGTERM) at an optimizer-step boundary, and refuses to go on
when the loss is not finite: that check runs every SYNC_EVERY batches and before the epoch (or an
interrupted part of it) returns, so the weights a NaN reached are never saved, and the message names
the first bad batch.
"""

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vit import distributed
from vit.errors import UserError
from vit.evaluation import oom_hint
from vit.precision import autocast
from vit.train.checkpoint import set_rng_state
from vit.train.optim import set_lr


SYNC_EVERY = 10  # training batches between host syncs (progress bar, NaN check)
RATE_AFTER = (5, 35)  # the speed an epoch reports to on_rate: measured from batch 5 (past warm-up) to batch 35


class NonFiniteLoss(UserError):
    """The loss became NaN or inf; training cannot continue from this state."""


@dataclass(frozen=True)
class StepSettings:
    """What a training step needs from params' train section, built once per run with the precision
    resolved (train.precision may say "auto"; vit/precision.py decides)."""

    precision: str  # "bf16", "fp16" or "fp32"
    grad_accum: int
    clip_grad: Optional[float]  # max global grad norm; None: no clipping
    label_smoothing: float
    batch_size: int  # per process: only named in the out-of-memory advice

    @classmethod
    def from_params(cls, train: dict, precision: str) -> "StepSettings":
        return cls(precision, train["grad_accum"], train["clip_grad"], train["label_smoothing"], train["batch_size"])

    @property
    def oom_advice(self) -> str:
        """What to change in params.json when a training step runs out of memory."""
        bs, ga = self.batch_size, self.grad_accum
        return (f"lower train.batch_size={bs} (e.g. --set train.batch_size={max(1, bs // 2)}) and raise "
                f"train.grad_accum (e.g. {ga * 2}) to keep the same effective batch.")


@dataclass(frozen=True)
class Trainer:
    """What trains, built once per run (vit/train/loop.py's set_up) and the same for every epoch."""

    model: torch.nn.Module  # what a step runs: the model, compiled when train.compile, under DDP with several processes
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    lr_fn: Callable[[int], float]  # the run's optimizer step -> lr
    settings: StepSettings
    d: distributed.Dist
    mixup_fn: Optional[Callable] = None  # timm's Mixup / CutMix on a batch, when train.mixup or train.cutmix is set
    backbone: Optional[torch.nn.Module] = None  # kept in eval mode: a linear probe trains the head only
    after_step: Optional[Callable[[int], None]] = None  # after each optimizer step, with the run's step count (the EMA update)


@dataclass(frozen=True)
class Epoch:
    """One pass over the loader: epoch `index` (0-based), beginning after `step` optimizer steps (0: at its
    start) with those steps' running metric `sums` and the `rng` state to restore there (a resumed run's
    checkpoint holds all three); `desc` labels its progress bar, `should_stop()` asks for a stop between
    steps (Ctrl-C, SIGTERM), and `on_rate(images_per_s, batches_done)` is called once with the speed over
    batches RATE_AFTER and the batches of this epoch done by then. `on_sync(step, sums, lr)` is called at
    each host sync with the run's optimizer step, the epoch's running sums and the lr (the per-step curves:
    vit/train/tensorboard.py), adding no sync of its own. `clock()` gives the seconds it measures with."""

    index: int
    step: int = 0
    sums: Optional[dict] = None
    rng: Optional[dict] = None
    desc: str = ""
    should_stop: Callable[[], bool] = lambda: False
    on_rate: Optional[Callable[[float, int], None]] = None
    on_sync: Optional[Callable[[int, dict, float], None]] = None
    clock: Callable[[], float] = time.perf_counter


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Soft targets (from Mixup/CutMix) -> timm's SoftTargetCrossEntropy; hard labels -> smoothed CE."""
    logits = logits.float()
    if targets.ndim == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed torch, numpy and random from (seed, epoch, rank): each epoch is a pure function of its start."""
    s = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's lr now, before layer decay scales it per group."""
    return optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_scale"]


def train_one_epoch(trainer: Trainer, loader, epoch: Epoch) -> dict:
    """One pass over `loader` on the trainer's device. Returns the epoch's averages (`loss`, `acc`,
    `images_per_s`, `lr`) plus `interrupted`, `step_in_epoch` and the raw `sums`."""
    model, optimizer, scaler, lr_fn, settings, d = (trainer.model, trainer.optimizer, trainer.scaler, trainer.lr_fn,
                                                     trainer.settings, trainer.d)
    device, ga, index = d.device, settings.grad_accum, epoch.index
    n = len(loader)
    steps_per_epoch = math.ceil(n / ga)
    sums = dict(epoch.sums or {"loss": 0.0, "correct": 0.0, "count": 0.0})
    # the running sums stay on the device and reach the host every SYNC_EVERY batches (bar, NaN check):
    # a sync per step would leave the GPU idle while the host queues the next step. float64, added in
    # the same order as on the host, so resumed epochs add up bit for bit
    running = torch.tensor([sums["loss"], sums["correct"]], dtype=torch.float64, device=device)
    first_bad = torch.zeros(2, dtype=torch.float64, device=device)  # (batch number, loss) of the first non-finite loss

    def pull(i):
        """Sync: the sums to the host, and stop if a loss up to batch i was not finite (before any save)."""
        loss_sum, correct, bad_at, bad_loss = torch.cat([running, first_bad]).tolist()
        if distributed.any_rank(bad_at > 0, d):
            where = (f"{bad_loss} at epoch {index + 1}, batch {int(bad_at)}/{n} "
                     f"(lr {lr_fn(index * steps_per_epoch + (int(bad_at) - 1) // ga):.3g})" if bad_at > 0
                     else f"non-finite on another rank in epoch {index + 1}, by batch {i + 1}/{n}")
            raise NonFiniteLoss(f"the training loss became {where}")  # vit/train/loop.py finishes the sentence
        sums.update(loss=loss_sum, correct=correct)

    model.train()
    if trainer.backbone is not None:
        trainer.backbone.eval()
    # no partial accumulation carries over: a loader that drops an all-broken last batch yields fewer than
    # len(loader) batches, so `i + 1 == n` below never fires and its gradients would leak into this epoch
    optimizer.zero_grad(set_to_none=True)
    skip = epoch.step * ga
    bar = tqdm(total=n, initial=skip, desc=epoch.desc, disable=not d.is_main, dynamic_ncols=True, leave=False)
    step_in_epoch, interrupted = epoch.step, False
    clock = epoch.clock
    t0, seen, i = clock(), 0, skip - 1
    with bar, oom_hint(settings.oom_advice):  # the bar closes on errors too, so an error line starts on a line of its own
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue  # resuming mid-epoch: the loader's order is a pure function of the epoch
            if i == skip and epoch.rng is not None:
                set_rng_state(epoch.rng, device)  # dropout / drop-path / mixup continue where they stopped
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if i % ga == 0:
                set_lr(optimizer, lr_fn(index * steps_per_epoch + i // ga))
            targets = y
            if trainer.mixup_fn is not None and len(x) % 2 == 0:  # timm's batch mixup needs pairs
                x, targets = trainer.mixup_fn(x, y)
            last_micro = (i + 1) % ga == 0 or i + 1 == n
            # under DDP, all-reduce gradients only on the micro-step that ends an accumulation
            sync = nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(device, settings.precision):
                    logits = model(x).logits  # (B, num_labels)
                loss = loss_fn(logits, targets, settings.label_smoothing)
                scaler.scale(loss / ga).backward()
            loss = loss.detach().double()
            running += torch.stack([loss * len(y), (logits.argmax(-1) == y).sum().double()])
            fresh = ~torch.isfinite(loss) & (first_bad[0] == 0)
            first_bad.copy_(torch.where(fresh, torch.stack([torch.full_like(loss, i + 1), loss]), first_bad))
            if last_micro:
                if settings.clip_grad is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], settings.clip_grad
                    )
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step_in_epoch += 1
                if trainer.after_step is not None:
                    trainer.after_step(index * steps_per_epoch + step_in_epoch)
            sums["count"] += len(y)
            seen += len(y)
            bar.update(1)
            if epoch.on_rate is not None and i - skip in RATE_AFTER:
                pull(i)  # waits for the device, so the clock sees finished work
                if i - skip == RATE_AFTER[0]:
                    rate_t0, rate_seen = clock(), seen
                else:
                    epoch.on_rate((seen - rate_seen) * d.world_size / max(clock() - rate_t0, 1e-9), i + 1)
            if i % SYNC_EVERY == 0:
                pull(i)
                if epoch.on_sync is not None:
                    epoch.on_sync(index * steps_per_epoch + step_in_epoch, sums, base_lr(optimizer))
                rate = seen * d.world_size / max(clock() - t0, 1e-9)
                bar.set_postfix(loss=f"{sums['loss'] / sums['count']:.4f}",
                                acc=f"{sums['correct'] / sums['count']:.4f}", img_s=f"{rate:.0f}", refresh=False)
            # stop only between optimizer steps, and on every rank together
            if last_micro and i + 1 < n and distributed.any_rank(epoch.should_stop(), d):
                interrupted = True
                break
        pull(i)  # the epoch's (or the interrupted part's) last batches, before anything is saved
    elapsed = max(clock() - t0, 1e-9)
    total = distributed.all_reduce_sum(
        torch.tensor([sums["loss"], sums["correct"], sums["count"], seen], dtype=torch.float64, device=device), d
    ).tolist()
    return {
        "loss": total[0] / max(total[2], 1),
        "acc": total[1] / max(total[2], 1),
        "images_per_s": total[3] / elapsed,
        "lr": base_lr(optimizer),
        "interrupted": interrupted,
        "step_in_epoch": step_in_epoch,
        "sums": sums,
    }
