"""How long a training run is: its epochs, the schedule's length, and a time budget that decides them.

`train.time_budget` (minutes; null: none) caps the run's wall time, counted like `elapsed_s` from
the launch of its first process: set-up, every evaluation, the checkpoints and figures and the
end-of-run report all fall inside it. `train.epochs` is then the most the run trains.

- **Decide once.** A few dozen steps into the first epoch the run knows its training speed. From it,
  the time already spent, an evaluation's cost and a reserve for the report, `Plan.decide` sets how
  many epochs fit, and the learning-rate schedule is sized to them. A few dozen steps are a short
  look at a noisy machine (on a shared 2-core VM they read 20% slow), so after the first whole epoch,
  which also measured an evaluation, `Plan.revise` lengthens the plan once when more epochs fit, up
  to train.epochs (shortening is left to the checks below). The plan is saved in every checkpoint;
  `--resume` keeps it and never decides again, so a resumed run stays bit-exact.
- **A machine that slows down.** After each later epoch (but the first of a resumed process, which
  carries one-time costs: the first evaluation and figure, compilation) `Plan.check` projects the
  run's end from that epoch's cost. When the planned epochs no longer fit, the run is shortened to those that
  do, never below one more epoch: the rest of the learning-rate decay is compressed onto the epochs
  left (optim.decay_progress), so the rate still reaches its floor, without a jump. When even one
  more epoch overruns, the line says by how much. Nothing overruns silently, and after the revision
  a run never lengthens: a machine that speeds up finishes early.
- **Patch dropout** (train.patch_dropout) makes the epochs that drop patches cheaper than the rest
  (each costs `drop_share` of a full one, from the start-up's timed saving and the run's own speed,
  kept in the plan): the first `patch_dropout_until` of the planned epochs drop patches, and every
  projection counts each epoch at its own cost.

The schedule's length is `Plan.totals`, [(from step, total steps), ...]: the length train.epochs
gives, then one pair for each change. Every decision is also kept as a sentence in `Plan.notes`.
`Plan` reads no clock: its times are seconds since the run's launch. `announce_speed` and `judge` are
where the training run (vit/train/loop.py's Run) consults it, with rank 0's figures on every rank so
that all ranks train the same schedule.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from tqdm import tqdm

from vit import distributed, precision as precisions
from vit.train.report import cost_line, speed_phrase
from vit.viz.text import count

REPORT_S = 10.0  # kept free for the end-of-run report: confusion matrix, misclassified grid, summary
EPOCH_OVERHEAD_S = 1.0  # an epoch's files besides training and evaluation: checkpoints, metrics.jsonl, curves.png
SAFETY = 0.98  # the share of the time left that the decision plans to use: measured speed is noisy
EVAL_COST = 1 / 3  # an evaluated image costs about a third of a trained one: a forward pass alone


@dataclass
class Plan:
    """The run's length: the epochs it trains and the schedule's `totals`; budget_s is None without a
    budget. `drop_until` (from params) and `drop_share` (settled from the run's speed, saved) say which
    epochs drop patches and what such an epoch costs against a full one."""

    epochs: int
    steps_per_epoch: int
    budget_s: Optional[float] = None
    decided: bool = True  # False until a budgeted run has measured its speed and chosen its epochs
    totals: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    drop_until: float = 0.0
    drop_share: float = 1.0
    drop_saving: float = 0.0  # seconds a trained image saves when patches drop, timed at the start (0: not timed)
    revised: bool = False  # set again after the first whole epoch, the one time the plan may grow

    @classmethod
    def start(cls, epochs: int, steps_per_epoch: int, budget_min: Optional[float], **dropout) -> "Plan":
        """A new run's plan: train.epochs, until a budget (minutes) decides."""
        budget_s = None if budget_min is None else 60.0 * budget_min
        return cls(epochs, steps_per_epoch, budget_s, budget_s is None, [(0, epochs * steps_per_epoch)], **dropout)

    def state_dict(self) -> dict:
        """What a checkpoint keeps (plain types, for a weights_only load)."""
        return {"epochs": self.epochs, "budget_s": self.budget_s, "decided": self.decided,
                "totals": [list(t) for t in self.totals], "notes": list(self.notes), "drop_share": self.drop_share,
                "drop_saving": self.drop_saving, "revised": self.revised}

    @classmethod
    def from_state(cls, state: dict, steps_per_epoch: int, **dropout) -> "Plan":
        """The plan a checkpoint kept (its state_dict()); the drop share settled when the run started wins
        over `dropout`'s, so that the resumed run judges its epochs as the uninterrupted one does."""
        if dropout and "drop_share" in state:
            dropout = {**dropout, "drop_share": state["drop_share"], "drop_saving": state.get("drop_saving", 0.0)}
        plan = cls(int(state["epochs"]), steps_per_epoch, state["budget_s"], bool(state["decided"]),
                   [tuple(t) for t in state["totals"]], list(state["notes"]), **dropout)
        plan.revised = bool(state.get("revised", True))
        return plan

    @classmethod
    def resumed(cls, state: Optional[dict], steps_per_epoch: int, epochs: int, budget_min: Optional[float],
                **dropout) -> tuple["Plan", Optional[str]]:
        """The plan a resumed run goes on with, and a line to print when the params changed it.

        The saved plan stands, decisions included. Without a budget, train.epochs may be changed on
        resume; setting train.time_budget to null lifts a budget the same way: the schedule is then the
        one train.epochs would have had from the start. A changed budget keeps the plan made at the start."""
        if state is None:  # a checkpoint from before plans were saved: its length was train.epochs
            return cls.start(epochs, steps_per_epoch, None, **dropout), None
        plan = cls.from_state(state, steps_per_epoch, **dropout)
        if budget_min is not None:
            if plan.budget_s is not None and math.isclose(60.0 * budget_min, plan.budget_s):
                return plan, None
            was = "without a budget" if plan.budget_s is None else f"with a budget of {plan.budget_s / 60:g} min"
            return plan, (f"note: train.time_budget is {budget_min:g} min now, but this run was planned {was} "
                          f"({count(plan.epochs, 'epoch')}); the plan is kept. To train another number of epochs, "
                          f"set train.time_budget to null and train.epochs.")
        if plan.budget_s is None and epochs == plan.epochs:
            return plan, None
        lifted = "" if plan.budget_s is None else f", its time budget of {plan.budget_s / 60:g} min lifted (train.time_budget is null)"
        return cls.start(epochs, steps_per_epoch, None, **dropout), f"the run now trains {count(epochs, 'epoch')} (train.epochs){lifted}"

    # -- what each epoch costs

    def drop_epochs(self, epochs: Optional[int] = None) -> int:
        """How many epochs, from the first, drop patches when the run has `epochs` (default: as planned)."""
        epochs = self.epochs if epochs is None else epochs
        return int(self.drop_until * epochs + 0.5)

    def settle_share(self, epoch: int, rate: float) -> None:
        """`drop_share` from `rate`, the images/s the run measured in `epoch`, and the timed saving: the
        saving is what dropping patches takes off a step, the rest of the step (the optimizer, the batch's
        augmentation) is the same in both kinds of epoch, so the run's speed sets their ratio."""
        if self.drop_saving > 0 and rate > 0:
            t = 1.0 / rate
            full, dropped = (t + self.drop_saving, t) if epoch < self.drop_epochs() else (t, max(t - self.drop_saving, 0.01 * t))
            self.drop_share = dropped / full

    def share(self, epoch: int, epochs: Optional[int] = None) -> float:
        """Epoch `epoch`'s (0-based) training cost against an epoch on all patches."""
        return self.drop_share if epoch < self.drop_epochs(epochs) else 1.0

    def seconds(self, first: int, epochs: int, full_s: float, eval_s: float, eval_every: int) -> float:
        """What epochs `first` to `epochs` - 1 take when a full epoch trains in `full_s` and an
        evaluation takes `eval_s`."""
        return sum(epoch_cost(full_s * self.share(e, epochs), eval_s, eval_every) for e in range(first, epochs))

    def most_that_fit(self, lengths: range, first: int, room: float, full_s: float, eval_s: float,
                      eval_every: int) -> Optional[int]:
        """The first of `lengths` (run lengths, longest first) whose epochs from `first` on take at most
        `room` seconds, or None."""
        return next((n for n in lengths if self.seconds(first, n, full_s, eval_s, eval_every) <= room), None)

    # -- decisions

    def decide(self, *, now_s: float, step: int, epoch_train_s: float, left_s: float, eval_s: float,
               eval_every: int) -> str:
        """Once, early in the run's first epoch, whose training takes `epoch_train_s` at the speed just
        measured with `left_s` of it still to go, `now_s` after the launch: the most epochs that fit in
        the budget. Sets the plan from `step` on and returns the line the run prints."""
        full_s = epoch_train_s / self.share(0)
        room = SAFETY * (self.budget_s - now_s - REPORT_S) - epoch_cost(left_s, eval_s, eval_every)
        fit = self.most_that_fit(range(self.epochs, 1, -1), 1, room, full_s, eval_s, eval_every) or 1
        each = self.seconds(0, fit, full_s, eval_s, eval_every) / fit
        line = (f"budget {self.budget_s / 60:g} min: {'all ' * (fit == self.epochs > 1)}{count(fit, 'epoch')} "
                f"{'of train.epochs ' * (fit == self.epochs > 1)}fit{'s' * (fit == 1)} (≈ {each:.0f} s each with evaluation"
                + (f"; the first {self.drop_epochs(fit)} drop patches, at {self.drop_share:.0%} of a full epoch's training time"
                   if self.drop_epochs(fit) else "") + ")")
        if room < 0:
            over = now_s + epoch_cost(left_s, eval_s, eval_every) + REPORT_S - self.budget_s
            line += f"; not even one does, so the run trains 1 and ends ≈ {over:.0f} s past the budget"
        self.decided = True
        self.set_epochs(fit, step)
        self.notes.append(line)
        return line

    def check(self, *, now_s: float, epochs_done: int, train_s: float, eval_s: float, eval_every: int,
              step: int) -> Optional[str]:
        """After an epoch that trained in `train_s` (the last evaluation took `eval_s`): shorten the run
        when the planned epochs no longer fit at that speed, never below one more. Returns the line to
        print, or None when the plan stands."""
        if self.budget_s is None:
            return None
        if not self.revised:
            return self.revise(now_s=now_s, epochs_done=epochs_done, train_s=train_s, eval_s=eval_s,
                               eval_every=eval_every, step=step)
        if epochs_done >= self.epochs:
            return None
        full_s, room = train_s / self.share(epochs_done - 1), self.budget_s - now_s - REPORT_S
        if self.seconds(epochs_done, self.epochs, full_s, eval_s, eval_every) <= room:
            return None
        fit = self.most_that_fit(range(self.epochs - 1, epochs_done + 1, -1), epochs_done, room, full_s, eval_s,
                                 eval_every) or epochs_done + 1
        line = (f"budget: an epoch now takes ≈ {epoch_cost(full_s, eval_s, eval_every):.0f} s on all patches, so "
                f"{count(self.epochs - epochs_done, 'more epoch')} no longer fit in {self.budget_s / 60:g} min")
        if fit < self.epochs:
            line += (f": the run ends after epoch {fit} instead of {self.epochs}, its learning-rate decay compressed "
                     f"onto the epochs left")
            self.set_epochs(fit, step)
        over = self.seconds(epochs_done, fit, full_s, eval_s, eval_every) - room
        if over > 0:  # one more epoch is the least the learning rate can still decay over
            line += f"; the last epoch will end ≈ {over:.0f} s past the budget of {self.budget_s / 60:g} min"
        self.notes.append(line)
        return line

    def revise(self, *, now_s: float, epochs_done: int, train_s: float, eval_s: float, eval_every: int,
               step: int) -> Optional[str]:
        """Once, after the first whole epoch: where the decision saw a few dozen steps, this sees an epoch
        and its evaluation. When more epochs fit at that speed (up to train.epochs), the plan grows to
        them and the rest of the decay is spread over them without a jump. It never shortens the plan: a
        slow first epoch on a shared machine may be a moment, and the check after every later epoch,
        which sees fresh speeds, shortens the run when they say so. Returns the line to print, or None."""
        self.revised = True
        full_s, cap = train_s / self.share(epochs_done - 1), self.totals[0][1] // self.steps_per_epoch
        room = SAFETY * (self.budget_s - now_s - REPORT_S)
        fit = self.most_that_fit(range(cap, self.epochs, -1), epochs_done, room, full_s, eval_s, eval_every)
        if fit is None:  # no longer plan fits: the checks of the later epochs shorten it if need be
            return None
        line = (f"budget: a whole epoch measured, an epoch on all patches takes ≈ {epoch_cost(full_s, eval_s, eval_every):.0f} s "
                f"with evaluation, so {count(fit, 'epoch')} fit, not {self.epochs}: the run now ends after epoch {fit}, "
                f"its learning-rate decay stretched over the epochs left")
        self.set_epochs(fit, step)
        self.notes.append(line)
        return line

    def set_epochs(self, epochs: int, step: int) -> None:
        """The run now ends after `epochs`: the decay from `step` on is spread over what is left."""
        if epochs != self.epochs:
            self.totals.append((step, epochs * self.steps_per_epoch))
            self.epochs = epochs


def epoch_cost(train_s: float, eval_s: float, eval_every: int) -> float:
    """Seconds an epoch takes: its training, its share of an evaluation (one every `eval_every`
    epochs), and the files it writes."""
    return train_s + eval_s / eval_every + EPOCH_OVERHEAD_S


# -----------------------------------------------------------------------------
# the run's side


def dropout_plan(train: dict, model=None, sample_shape=None, device=None, precision=None) -> dict:
    """Plan's drop_until, drop_share and drop_saving for train.patch_dropout: which epochs drop patches,
    and what such an epoch costs against one on all of them. That is not the share of the tokens kept: a
    step's fixed costs (and, on a CPU, threads with less work each) stay. So, given the model, forward
    and backward passes of a copy with and without the drop are timed in turns (vit/precision.py): their
    difference is what dropping saves per image, and Plan.settle_share turns it into a share once the
    run has measured its own speed. Without the model (a resumed run reads them from its plan): the
    share of the tokens kept."""
    if not train["patch_dropout"] or train["freeze_backbone"]:  # a frozen backbone runs in eval mode: no patch drops
        return {}
    plan = {"drop_until": train["patch_dropout_until"], "drop_share": 1.0 - train["patch_dropout"]}
    if model is not None:
        def prepare(prob):
            return lambda probe: setattr(probe.vit.patch_drop, "prob", prob)

        times, batch = precisions.interleaved_steps(model, sample_shape, device, {"all": (precision, prepare(0.0)),
                                                                       "drop": (precision, prepare(train["patch_dropout"]))})
        plan.update(drop_share=min(1.0, times["drop"] / times["all"]), drop_saving=max(0.0, times["all"] - times["drop"]) / batch)
    return plan


def start_line(plan: Plan, train: dict) -> Optional[str]:
    """What the start-up lines say of the run's length: the budget still to decide, patch dropout."""
    parts = []
    if not plan.decided:
        parts.append(f"time budget {plan.budget_s / 60:g} min: how many of train.epochs={plan.epochs} fit is decided "
                     f"a few dozen steps in")
    if plan.drop_until > 0:
        parts.append(f"patch dropout: the first {plan.drop_until:.0%} of the epochs train on "
                     f"{1 - train['patch_dropout']:.0%} of each image's patches (a forward and backward pass timed {1 / plan.drop_share:.2f}x faster)")
    elif train["patch_dropout"] and train["freeze_backbone"]:
        parts.append("train.patch_dropout does not apply: a frozen backbone (train.freeze_backbone) runs in eval mode")
    return "; ".join(parts) or None


def announce_speed(run, rate: float, epoch: int, batches_done: int) -> None:
    """The cost line from the speed the run measured `batches_done` batches into `epoch`, and with a
    time budget not yet decided, the decision of how many epochs fit."""
    t, d, loaders, plan = run.params["train"], run.d, run.loaders, run.plan
    if not plan.decided or plan.budget_s is None:  # a decided budget's share is kept, so that a resumed run judges alike
        plan.settle_share(epoch, distributed.gather(rate, d)[0])
    train_images = len(loaders.train) * t["batch_size"] * d.world_size
    val_images = loaders.report["val_files"] if loaders.val is not None else 0
    full_rate = rate * plan.share(epoch)  # images/s on all patches: evaluation sees them all
    epoch_s = train_images / full_rate
    line = cost_line(rate, epoch_s, val_images * EVAL_COST / full_rate, t["eval_every"],
                     [plan.share(e) for e in range(plan.epochs)], epoch, d.device, run.trainer.settings.precision)
    if not plan.decided:
        rate, now_s, epoch_s = distributed.gather((rate, run.clock() - run.started, epoch_s), d)[0]
        full_rate = rate * plan.share(epoch)
        line = speed_phrase(rate, d.device, run.trainer.settings.precision) + "; " + plan.decide(
            now_s=now_s, step=epoch * run.steps_per_epoch + math.ceil(batches_done / t["grad_accum"]),
            epoch_train_s=train_images / rate, left_s=(len(loaders.train) - batches_done) / len(loaders.train) * train_images / rate,
            eval_s=val_images * EVAL_COST / full_rate, eval_every=t["eval_every"])
    if d.is_main:  # with train.cache_features, a line under it on what was cached
        tqdm.write(line if getattr(run, "cache", None) is None else f"{line}\n{run.cache.note}")


def judge(run, epoch: int, train_s: float, now: float) -> None:
    """After `epoch` (0-based), which trained in `train_s`: shorten the run when its planned epochs no
    longer fit in the time budget (`now` on the run's clock)."""
    train_s, eval_s, now_s = distributed.gather((train_s, run.eval_s, now - run.started), run.d)[0]
    line = run.plan.check(now_s=now_s, epochs_done=epoch + 1, train_s=train_s, eval_s=eval_s,
                          eval_every=run.params["train"]["eval_every"], step=(epoch + 1) * run.steps_per_epoch)
    if line and run.d.is_main:
        print(line)
