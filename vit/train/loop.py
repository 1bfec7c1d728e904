"""The training run: set up from params.json, the epoch loop, each epoch's end and the run's end.

DeiT's main.py in four parts, each one function:
- `set_up`: params, processes, data, model, optimizer, precision, resume state, the run folder;
- `run_epochs`: train each epoch (engine.train_one_epoch), stopping cleanly on Ctrl-C / SIGTERM;
- `end_epoch`: evaluate (the EMA weights too when kept), record, save best and last, rewrite
  metrics.jsonl, redraw curves.png;
- `finish`: the report from the last epoch's evaluation, and the summary line.
`train` runs them and returns the exit code. What the run prints and its report's files are report.py's.
"""

import functools
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from vit import data, distributed, evaluation, factory
from vit import params as P
from vit import precision as precisions
from vit.errors import UserError
from vit.files import atomic_write
from vit.loading.core import is_file
from vit.model import ViTForImageClassification
from vit.run_folder import BEST, CURVES, HF_DIR, LAST, METRICS, PARAMS
from vit.train import budget, checkpoint, engine, feature_cache, fsdp, optim, tensorboard
from vit.train.checkpoint import Progress
from vit.train.report import data_counts, epoch_line, report, summary_line, writing
from vit.viz import plots
from vit.viz.text import count


def train(params_file: str = "params.json", overrides: Sequence[str] = (), resume: bool = False,
          launched: Optional[float] = None, launcher: Sequence[str] = ("python", "main.py"),
          clock: Callable[[], float] = time.perf_counter) -> int:
    """The training run: `params_file` with `--set` overrides, or its continuation from last.pt.

    `launched` is when the process started (elapsed_s counts from it), else now; `launcher` the words
    that started it (`torchrun ... main.py`, `vit`, ...), for the resume command it prints; `clock()`
    the seconds that elapsed_s, the speed and the time budget are measured in (tests pass a fake one).
    Returns the exit code: 0, or 128 + the signal that asked it to stop.
    """
    run = set_up(params_file, list(overrides), resume, clock() if launched is None else launched, launcher, clock)
    with distributed.watch_peers(run.d, run.resume_hint):  # another node gone: one sentence, not a hang
        with tensorboard.closing(run.board), StopRequest() as stop:
            code, final_val = run_epochs(run, stop)
        if code == 0 and distributed.any_rank(stop(), run.d):
            # the signal came after the last epoch's stop check: that epoch is saved (the last one always is),
            # and what it asked for is a stop, so the report waits for --resume
            print(f"stopped after the last epoch, before the end-of-run report; {run.path(LAST)} holds all "
                  f"{count(run.plan.epochs, 'epoch')}. Resume with: {run.resume_hint} (it writes the report)")
            code = 128 + (stop.signum or signal.SIGINT)
        elif code == 0:
            finish(run, final_val)
    distributed.cleanup(run.d)
    return code


# -----------------------------------------------------------------------------
# set-up

TINY_LR = 1e-5  # below it, after lr_scale_batch, the start-up lines warn


@dataclass
class Run:
    """One training run once set up: what its epochs use, and `progress`, what a checkpoint saves."""

    params: dict
    d: distributed.Dist
    loaders: data.Loaders
    model: ViTForImageClassification  # the plain model: saved, and its parameters optimized
    trainer: engine.Trainer  # what each step runs: the model (compiled, under DDP), optimizer, scaler, schedule
    evaluator: torch.nn.Module  # the model, compiled when train.compile; evaluation runs it without DDP
    progress: Progress
    rng: Optional[dict]  # this rank's RNG state to restore when resuming mid-epoch
    started: float  # perf_counter() at which the run's elapsed_s was 0 (earlier processes' time included)
    resume_hint: str  # the command that continues this run
    plan: budget.Plan  # how many epochs the run trains, and the schedule's length (decided by a time budget)
    ema: Optional[torch.nn.Module] = None  # timm's ModelEmaV3 of the weights, when train.ema_decay is set
    clock: Callable[[], float] = time.perf_counter  # what started, elapsed_s and the budget are measured with
    eval_s: float = 0.0  # how long the last evaluation took, for the time budget's projection
    board: Optional[tensorboard.Board] = None  # the TensorBoard event file (rank 0, output.tensorboard)
    cache: Optional[feature_cache.FeatureCache] = None  # train.cache_features: loaders.train serves its rows

    def path(self, name: str) -> str:
        return os.path.join(self.params["output"]["dir"], name)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.loaders.train) / self.params["train"]["grad_accum"])

    @property
    def picks_ema(self) -> bool:
        """Whether the EMA weights' val_acc_ema picks best.pt and best_hf/ (output.best_metric)."""
        return self.params["output"]["best_metric"] == "val_acc_ema"

    def save(self, path: str, **progress) -> dict:
        """A checkpoint of the run at `path`, with `progress` fields changed (an interrupted epoch's step_in_epoch
        and sums): rank 0 writes, the others wait; returns the whole weights it saved (gathered under FSDP)."""
        self.progress.elapsed_s = self.clock() - self.started
        self.progress.plan = self.plan.state_dict()
        state = fsdp.full_state(self.model, self.trainer.optimizer)
        rngs = distributed.gather(checkpoint.rng_state(self.d.device), self.d)
        if self.d.is_main:
            payload = checkpoint.training_payload(self.model, state, self.trainer.scaler,
                                                  replace(self.progress, **progress), self.resume_hint, self.params,
                                                  self.loaders, rngs, self.ema, nodes=self.d.nodes)
            checkpoint.save(path, payload)
        distributed.barrier(self.d)
        return state[0]


def set_up(params_file: str, overrides: list, resume: bool, launched: float, launcher: Sequence[str] = ("python", "main.py"),
           clock: Callable[[], float] = time.perf_counter) -> Run:
    """Everything the epochs need, in the order that keeps runs reproducible, and the run folder."""
    params = P.load(params_file, overrides)
    wants_board = tensorboard.wanted(params["output"]["tensorboard"])  # true without the package stops here
    d = distributed.init(params["train"]["device"], timeout_s=params["train"]["dist_timeout_s"])
    t, out, device = params["train"], params["output"]["dir"], d.device
    last_path = os.path.join(out, LAST)
    command = functools.partial(resume_command, launcher, params_file, overrides)
    if resume and not is_file(last_path):
        raise UserError(f"--resume found no checkpoint at {last_path}; start without --resume or set output.dir.")
    distributed.check_shared(is_file(last_path), last_path, d)
    if not resume and is_file(last_path):
        raise UserError(f"{out} already holds a run ({last_path}); pass --resume to continue it or set output.dir to a new folder.")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast (the loss, the optimizer)
        torch.backends.cudnn.allow_tf32 = True
    engine.seed_epoch(t["seed"], 0, 0)  # model init: the same on every rank (DDP also broadcasts rank 0's)

    # the model before the data: a checkpoint's patch or size that cannot work is refused before any image is decoded
    model = factory.build_model(params, data.class_names(params["data"])).to(device)
    loaders = data.build_loaders(params["data"], t, device, d.rank, d.world_size)
    if t["freeze_backbone"]:
        optim.freeze_backbone(model)
    if t["grad_checkpointing"]:
        model.gradient_checkpointing_enable()
    optimizer = optim.build_optimizer(model, t, device)
    ema = None
    if t["ema_decay"] is not None:
        from timm.utils import ModelEmaV3

        # a copy of the weights, updated after every optimizer step; its decay warms up from 0
        # (1 - (1 + step)^-2/3, capped at ema_decay) so early steps are not averaged with the init
        ema = ModelEmaV3(model, decay=t["ema_decay"], use_warmup=True)
    steps_per_epoch = math.ceil(len(loaders.train) / t["grad_accum"])
    progress, rng, scaler_state, plan = (restore(last_path, model, optimizer, d, t, command, steps_per_epoch, ema)
                                         if resume else (Progress(), None, None, None))
    sample_shape = (t["batch_size"], params["data"]["channels"], params["data"]["image_size"], params["data"]["image_size"])
    # every rank trains in rank 0's choice (auto times steps, and two ranks could time them differently)
    precision, why = distributed.gather(precisions.resolve(t["precision"], device, model, sample_shape,
                                                           saved=progress.precision), d)[0]
    if plan is None:  # a new run: what a step that drops patches costs is timed, rank 0's figure for all
        dropout = distributed.gather(budget.dropout_plan(t, model, sample_shape, device, precision), d)[0]
        plan = budget.Plan.start(t["epochs"], steps_per_epoch, t["time_budget"], **dropout)
    progress.precision, progress.device = precision, device.type
    if t["strategy"] == "fsdp":  # after resume and the precision probe, which need the whole model
        optimizer = fsdp.shard(model, optimizer, t, precision, d)
    evaluator = torch.compile(model) if t["compile"] else model
    cache = feature_cache.build(params, loaders, model, precision, d) if t["cache_features"] else None
    if cache:  # the frozen backbone ran once, here: the epochs train the head over its features
        loaders = replace(loaders, train=cache.train)
    trainer = make_trainer(params, loaders, feature_cache.HeadOnly(evaluator) if cache else evaluator, optimizer, precision,
                           scaler_state, d, plan, backbone=model.vit if t["freeze_backbone"] else None,
                           after_step=None if ema is None else functools.partial(ema.update, model))
    run = Run(params, d, loaders, model, trainer, evaluator, progress, rng,
              started=launched - progress.elapsed_s,  # a resumed run's clock goes on where it stopped
              resume_hint=command(), plan=plan, ema=ema, clock=clock, cache=cache)
    open_run_folder(run, why)
    if wants_board and d.is_main:  # a resumed run's events from after its checkpoint are purged, then written again
        run.board = tensorboard.Board(out, params, resumed_step=progress.step if resume else None)
    return run


def make_trainer(params: dict, loaders: data.Loaders, evaluator: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 precision: str, scaler_state: Optional[dict], d: distributed.Dist, plan: budget.Plan,
                 **extras) -> engine.Trainer:
    """How each step trains: the evaluator under DDP, the gradient scaler (fp16 only; `scaler_state` a
    resumed run's), the lr schedule over `plan`'s length (read at every step: a time budget changes it)
    and Mixup/CutMix, with `extras` (the frozen backbone, the EMA update)."""
    t = params["train"]
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    if scaler_state and scaler.is_enabled():  # empty when saved without fp16: a switch to fp16 starts a fresh scale
        scaler.load_state_dict(scaler_state)
    base_lr, min_lr = optim.scaled_lr(t, d.world_size), t["min_lr"]
    # a short run (--set train.epochs=3) may be shorter than the warm-up: clip it to the length it started with
    warmup_steps = round(min(t["warmup_epochs"] * plan.steps_per_epoch, plan.totals[0][1]))

    def lr_fn(step):
        return optim.lr_at(step, base_lr, min_lr, warmup_steps, plan.totals)
    mixup_fn = None
    if t["mixup"] > 0 or t["cutmix"] > 0:
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=t["mixup"], cutmix_alpha=t["cutmix"], label_smoothing=t["label_smoothing"],
                         num_classes=len(loaders.classes))
    return engine.Trainer(distributed.wrap(evaluator, d, t["strategy"]), optimizer, scaler, lr_fn, engine.StepSettings.from_params(t, precision),
                          d, mixup_fn, **extras)


def resume_command(launcher: Sequence[str], params_file: str, overrides: Sequence[str], more: Sequence[str] = ()) -> str:
    """What continues this run: the words that launched it, its params file, its --set overrides and
    `more` of them, then --resume."""
    sets = [*overrides, *more]
    return shlex.join([*launcher, *(["--params", params_file] if params_file != "params.json" else []),
                       *(["--set", *sets] if sets else []), "--resume"])


def restore(last_path: str, model, optimizer, d: distributed.Dist, t: dict, command: Callable, steps_per_epoch: int,
            ema=None):
    """Resume from last.pt: its Progress, this rank's RNG state, the gradient scaler's state and the run's
    plan (and the EMA's weights); `command(more)` is the resume command with `more` --set overrides."""
    progress, rngs, scaler_state = checkpoint.resume(last_path, model, optimizer, (d.world_size, t["batch_size"], t["grad_accum"]), ema)
    # each rank continues its own streams and metric sums (another world size cannot be exact anyway)
    rank = d.rank if d.rank < len(rngs) else 0
    progress.sums = progress.sums[rank] if progress.sums else None
    plan, change = budget.Plan.resumed(progress.plan, steps_per_epoch, t["epochs"], t["time_budget"],
                                       **budget.dropout_plan(t))
    if change:
        print(change)
    if progress.epoch >= plan.epochs:
        more = [f"train.epochs={progress.epoch + 10}"] + (["train.time_budget=null"] if plan.budget_s is not None else [])
        print(f"{last_path} holds all {count(progress.epoch, 'epoch')} of its run, which is complete: nothing to train, "
              f"so this only writes the end-of-run report again. To train longer, resume with more epochs, "
              f"e.g. {command(more)}")
    else:
        print(f"resuming {last_path}: {progress.epoch} epoch(s) done"
              + (f", {progress.step_in_epoch} step(s) into the next" if progress.step_in_epoch else "")
              + (f" of {plan.epochs} (planned within the time budget of {plan.budget_s / 60:g} min)" if plan.budget_s else ""))
    if isinstance(progress.device, str) and progress.device != d.device.type:
        print(f"note: the run trained on {progress.device} and resumes on {d.device.type}: the weights, optimizer state and "
              f"schedule carry over exactly, but another device computes (and draws random numbers) differently, so the "
              f"result will not be bit-identical to an uninterrupted run")
    if len(rngs) != d.world_size:
        print(f"note: the run had {len(rngs)} process(es) and this launch has {d.world_size}: the effective batch is "
              f"the same, but the result will not be bit-identical to an uninterrupted run")
    return progress, rngs[rank], scaler_state, plan


def open_run_folder(run: Run, why: str) -> None:
    """Rank 0: the run folder with the resolved params.json and metrics.jsonl, and the start-up lines;
    `why` says how the precision was chosen."""
    if not run.d.is_main:
        return
    out, t, d, loaders = run.params["output"]["dir"], run.params["train"], run.d, run.loaders
    try:
        os.makedirs(out, exist_ok=True)
        P.save(run.params, run.path(PARAMS))
        write_history(run.path(METRICS), run.progress.history)
    except OSError as e:  # output.dir names an existing file, a folder we may not write, a full disk
        raise UserError(f"params key output.dir={out!r} cannot hold the run ({e.strerror}); "
                        f"choose another folder or free space there.") from None
    batch, base_lr = t["batch_size"] * t["grad_accum"] * d.world_size, optim.scaled_lr(t, d.world_size)
    lr = f"lr {base_lr:.3g}"
    if t["lr_scale_batch"] is not None:  # the linear scaling rule can shrink a recipe's lr by orders of magnitude
        lr += f" (train.lr {t['lr']:g} x effective batch {batch} / lr_scale_batch {t['lr_scale_batch']})"
    print(f"{run.model.num_parameters():,} parameters, {len(loaders.classes)} classes, {len(loaders.train)} batches/epoch, "
          f"effective batch {batch}, {lr}, data {loaders.report.get('loader')}, run folder {out}")
    print(data_counts(run.params["data"], loaders, t["batch_size"] * d.world_size))
    if t["lr_scale_batch"] is not None and base_lr < TINY_LR:
        print(f"warning: lr_scale_batch makes the learning rate {base_lr:.2g}, too small to learn much in "
              f"{t['epochs']} epochs; raise train.lr, or set train.lr_scale_batch to the effective batch {batch} or to null")
    where = f"the CPU, {precisions.thread_note()}" if d.device.type == "cpu" else str(d.device)
    spread = f"; {t['strategy'].upper()} over {d.world_size} processes on {count(d.nodes, 'node')}" if d.enabled else ""
    print(f"training on {where}; precision {run.trainer.settings.precision} ({why}){spread}")
    if line := budget.start_line(run.plan, t):
        print(line)


def write_history(path: str, history: list) -> None:
    """Rewrite metrics.jsonl atomically from the records the checkpoint carries: one line per
    finished epoch, no duplicate after a resume and no gap after a kill between save and log."""
    atomic_write(path, lambda f: f.writelines(json.dumps(h) + "\n" for h in history), mode="w")


# -----------------------------------------------------------------------------
# the epochs


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
        if self.signum is not None:  # impatient second signal: no save, the last saved checkpoint stays as it is
            before = self.previous[signum]
            if callable(before):  # the command line's: its line, and exit 128 + signal (vit/cli.py)
                before(signum, frame)
            raise KeyboardInterrupt(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the next step, then stopping "
              f"(send it again to stop without saving).", file=sys.stderr)

    def __call__(self):
        return self.signum is not None


def run_epochs(run: Run, stop: StopRequest) -> tuple[int, Optional[dict]]:
    """Train from where the run stands to its last epoch; returns (exit code, the last epoch's
    evaluation with the report's extras, or None when it ran in an earlier process or not at all)."""
    t, d, progress, loaders = run.params["train"], run.d, run.progress, run.loaders
    last_path, measured, final_val = run.path(LAST), [], None
    first = epoch = progress.epoch
    whole = first == 0 and progress.step_in_epoch == 0  # this process trains epoch 1 whole: budget.Plan.revise follows it

    def on_rate(rate, batches_done):  # once per process, a few dozen steps into its first epoch
        if not measured:
            measured.append(rate)
            budget.announce_speed(run, rate, epoch, batches_done)

    while epoch < run.plan.epochs:  # a time budget may change plan.epochs mid-way (vit/train/budget.py)
        if progress.step_in_epoch == 0:
            engine.seed_epoch(t["seed"], epoch, d.rank)
            run.rng = None
        loaders.train.set_epoch(epoch)
        # the first epochs of the plan may train on a share of each image's patches (train.patch_dropout)
        run.model.vit.patch_drop.prob = t["patch_dropout"] if epoch < run.plan.drop_epochs() else 0.0
        epoch_start = run.clock()
        try:
            stats = engine.train_one_epoch(run.trainer, loaders.train, engine.Epoch(
                epoch, progress.step_in_epoch, progress.sums, run.rng, desc=f"epoch {epoch + 1}/{run.plan.epochs}",
                should_stop=stop, on_rate=on_rate, clock=run.clock,
                on_sync=None if run.board is None else run.board.steps(progress.sums)))
        except engine.NonFiniteLoss as e:
            kept = (f"the last good checkpoint {last_path} ({progress.epoch} epoch(s)) is intact"
                    if os.path.isfile(last_path) else "no checkpoint was saved yet")
            raise UserError(f"{e}, so training stopped: {kept}; lower train.lr or set train.clip_grad, then resume with --resume.") from None
        progress.step = epoch * run.steps_per_epoch + stats["step_in_epoch"]
        if stats["interrupted"]:
            run.save(last_path, step_in_epoch=stats["step_in_epoch"], sums=distributed.gather(stats["sums"], d))
            print(f"stopped in epoch {epoch + 1} after {stats['step_in_epoch']}/{run.steps_per_epoch} steps; "
                  f"saved {last_path}. Resume with: {run.resume_hint}")
            return 128 + (stop.signum or signal.SIGINT), None

        if not measured:  # an epoch too short to measure mid-way
            on_rate(stats["images_per_s"], len(loaders.train))
        # the first epoch of a resumed process carries one-time costs, so only later ones judge the budget
        final_val, stopping = end_epoch(run, epoch, stats, epoch_start, stop, judge_budget_now=epoch > first or whole)
        if stopping:  # after the last epoch too: resuming then only writes the end-of-run report
            print(f"stopped after epoch {epoch + 1}; saved {last_path}. Resume with: {run.resume_hint}")
            return 128 + (stop.signum or signal.SIGINT), None
        epoch += 1
    return 0, final_val


def end_epoch(run: Run, epoch: int, stats: dict, epoch_start: float, stop: StopRequest,
              judge_budget_now: bool = True) -> tuple[Optional[dict], bool]:
    """An epoch's end: evaluate (with the report's extras after the last), print and record its line,
    keep the time budget (when `judge_budget_now`), save best and last, rewrite metrics.jsonl, redraw
    the curves. Returns (the last epoch's evaluation or None, whether a stop was asked for)."""
    t, d, progress, loaders = run.params["train"], run.d, run.progress, run.loaders
    last_path, metrics_path = run.path(LAST), run.path(METRICS)
    record = {"epoch": epoch + 1, "loss": stats["loss"], "acc": stats["acc"]}
    is_last, final_val = epoch + 1 == run.plan.epochs, None
    eval_start = run.clock()
    if loaders.val is not None and ((epoch + 1) % t["eval_every"] == 0 or is_last):
        # the last epoch's pass over the weights that pick best also gathers what the end-of-run report shows
        val = val_pass(run, run.evaluator, report=is_last and not run.picks_ema)
        record.update({f"val_{k}": v for k, v in val.items() if k in ("loss", "acc", "top5")})
        if run.ema is not None:
            val_ema = val_pass(run, run.ema.module, report=is_last and run.picks_ema)
            record.update({f"val_{k}_ema": v for k, v in val_ema.items() if k in ("loss", "acc", "top5")})
            val = val_ema if run.picks_ema else val
        final_val = val if is_last else None
        run.eval_s = run.clock() - eval_start
    now = run.clock()  # epoch_s: this epoch's training + evaluation; elapsed_s: since launch
    record.update(lr=stats["lr"], images_per_s=round(stats["images_per_s"], 1), skipped=loaders.train.skipped,
                  epoch_s=round(now - epoch_start, 2), elapsed_s=round(now - run.started, 2))
    print(epoch_line(record))
    if judge_budget_now:  # before the saves, so that last.pt holds the plan the run goes on with
        budget.judge(run, epoch, eval_start - epoch_start, now)
    if run.board is not None:  # before the checkpoint: a resume from an earlier one purges it and writes it again
        run.board.epoch(progress.step, record)
    progress.history.append(record)
    progress.epoch, progress.step_in_epoch, progress.sums = epoch + 1, 0, None
    metric = run.params["output"]["best_metric"]
    is_best = record.get(metric, -1.0) > progress.best_acc
    if is_best:
        progress.best_acc = record[metric]
    stopping = distributed.any_rank(stop(), d)
    # best before last: a kill in between redoes this epoch on resume, which rewrites best identically
    if is_best:
        weights = run.save(run.path(BEST))
        if d.is_main:  # the weights that scored: the EMA's when they pick best
            checkpoint.save_hf(run.ema.module if run.picks_ema else run.model, run.path(HF_DIR), loaders.mean, loaders.std,
                               None if run.picks_ema else weights)
    if (epoch + 1) % run.params["output"]["save_every"] == 0 or is_last or stopping:
        run.save(last_path)
    if d.is_main:
        with writing(metrics_path, last_path):  # resuming rebuilds metrics.jsonl from the checkpoint's records
            write_history(metrics_path, progress.history)  # after the checkpoint: a line never outlives its epoch's state
        with writing(run.path(CURVES), last_path):
            plots.plot_curves(progress.history, run.path(CURVES))
    return final_val, stopping


def val_pass(run: Run, model: torch.nn.Module, report: bool = False) -> dict:
    """`model` on the val data; with a feature cache its head on the cached rows, but the report's pass sees the images."""
    if run.cache is not None and not report:
        return run.cache.evaluate(model, **eval_kw(run))
    return evaluation.evaluate(model, run.loaders.val, **eval_kw(run, report=report))


def eval_kw(run: Run, report: bool = False) -> dict:
    """evaluation.evaluate's arguments besides the model and loader; with report=True also the confusion
    matrix and misclassified images the end-of-run report shows."""
    kw = dict(num_classes=len(run.loaders.classes), d=run.d, precision=run.trainer.settings.precision,
              oom_advice=run.trainer.settings.oom_advice, lockstep=fsdp.is_sharded(run.model))
    if report:
        kw.update(mistakes=max(run.params["output"]["misclassified"], 1),
                  denormalize=functools.partial(data.denormalize, mean=run.loaders.mean, std=run.loaders.std))
    return kw


# -----------------------------------------------------------------------------
# the end of the run


def finish(run: Run, final_val: Optional[dict]) -> None:
    """The end-of-run report from the last epoch's evaluation, the bad-file count and the summary line."""
    loaders, d, out = run.loaders, run.d, run.params["output"]
    if loaders.val is not None:
        if final_val is None:  # resumed after the last epoch: its evaluation ran in the process that stopped
            final_val = val_pass(run, run.ema.module if run.picks_ema else run.evaluator, report=True)
        if d.is_main:
            report(final_val, loaders.classes, out["dir"], out["misclassified"])
    if loaders.report.get("skipped_at_scan") or loaders.report.get("dropped_at_load"):
        print(f"bad files: {loaders.report.get('skipped_at_scan', 0)} skipped at scan, "
              f"{loaders.report.get('dropped_at_load', 0)} dropped at load (see warnings above)")
    if d.is_main:
        print(summary_line(run.progress.history, run.clock() - run.started, out["dir"], out["best_metric"],
                           run.plan.budget_s))
