"""A time budget for a training run: how many epochs fit, decided once from the speed the run measures.

`train.time_budget` (minutes; null: none) caps the run's wall time, counted like `elapsed_s` from
the launch of its first process: set-up, every evaluation, the checkpoints and figures and the
end-of-run report all fall inside it. `train.epochs` is then the most the run trains.

- **Decide once.** A few dozen steps into the first epoch the run knows its training speed. From it,
  the time already spent, an evaluation's cost and a reserve for the report, `Plan.decide` sets how
  many epochs fit, and the learning-rate schedule is sized to them. The plan is saved in every
  checkpoint; `--resume` keeps it and never decides again, so a resumed run stays bit-exact.
- **A machine that slows down.** After each epoch (but the first of each process, which carries
  one-time costs: the first evaluation and figure, compilation) `Plan.check` projects the run's end
  from that epoch's cost. When the planned epochs no longer fit, the run is shortened to those that
  do, never below one more epoch: the rest of the learning-rate decay is compressed onto the epochs
  left (optim.decay_progress), so the rate still reaches its floor, without a jump. When even one
  more epoch overruns, the line says by how much. Nothing overruns silently, and a run never
  lengthens: a machine that speeds up finishes early.

The schedule's length is `Plan.totals`, [(from step, total steps), ...]: the length train.epochs
gives, then one pair for each change. Every decision is also kept as a sentence in `Plan.notes`.
All times are seconds since the run's launch; nothing here reads a clock.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

from vit.viz.text import count

REPORT_S = 10.0  # kept free for the end-of-run report: confusion matrix, misclassified grid, summary
EPOCH_OVERHEAD_S = 1.0  # an epoch's files besides training and evaluation: checkpoints, metrics.jsonl, curves.png
SAFETY = 0.98  # the share of the time left that the decision plans to use: measured speed is noisy
EVAL_COST = 1 / 3  # an evaluated image costs about a third of a trained one: a forward pass alone


@dataclass
class Plan:
    """The run's length: the epochs it trains and the schedule's `totals`; budget_s is None without a budget."""

    epochs: int
    steps_per_epoch: int
    budget_s: Optional[float] = None
    decided: bool = True  # False until a budgeted run has measured its speed and chosen its epochs
    totals: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @classmethod
    def start(cls, epochs: int, steps_per_epoch: int, budget_min: Optional[float]) -> "Plan":
        """A new run's plan: train.epochs, until a budget (minutes) decides."""
        budget_s = None if budget_min is None else 60.0 * budget_min
        return cls(epochs, steps_per_epoch, budget_s, budget_s is None, [(0, epochs * steps_per_epoch)])

    def state_dict(self) -> dict:
        """What a checkpoint keeps (plain types, for a weights_only load)."""
        return {"epochs": self.epochs, "budget_s": self.budget_s, "decided": self.decided,
                "totals": [list(t) for t in self.totals], "notes": list(self.notes)}

    @classmethod
    def from_state(cls, state: dict, steps_per_epoch: int) -> "Plan":
        """The plan a checkpoint kept (its state_dict())."""
        return cls(int(state["epochs"]), steps_per_epoch, state["budget_s"], bool(state["decided"]),
                   [tuple(t) for t in state["totals"]], list(state["notes"]))

    @classmethod
    def resumed(cls, state: Optional[dict], steps_per_epoch: int, epochs: int,
                budget_min: Optional[float]) -> tuple["Plan", Optional[str]]:
        """The plan a resumed run goes on with, and a line to print when the params changed it.

        The saved plan stands, decisions included. Without a budget, train.epochs may be changed on
        resume; setting train.time_budget to null lifts a budget the same way: the schedule is then the
        one train.epochs would have had from the start. A changed budget keeps the plan made at the start."""
        if state is None:  # a checkpoint from before plans were saved: its length was train.epochs
            return cls.start(epochs, steps_per_epoch, None), None
        plan = cls.from_state(state, steps_per_epoch)
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
        return cls.start(epochs, steps_per_epoch, None), f"the run now trains {count(epochs, 'epoch')} (train.epochs){lifted}"

    def decide(self, *, now_s: float, step: int, rate: float, train_images: int, val_images: int,
               eval_every: int, images_left: int) -> str:
        """Once, early in the first epoch: the epochs that fit in the budget at `rate` images/s (all
        processes together), `now_s` after the launch, with `images_left` to train in this epoch.
        Sets the plan from `step` on and returns the line the run prints."""
        epoch_s = self.epoch_estimate(rate, train_images, val_images, eval_every)
        this_epoch_s = images_left / rate + val_images * EVAL_COST / rate + EPOCH_OVERHEAD_S
        room = SAFETY * (self.budget_s - now_s - REPORT_S) - this_epoch_s
        fit = 1 + max(0, math.floor(room / epoch_s))
        minutes = f"budget {self.budget_s / 60:g} min"
        if fit > self.epochs:
            line = f"{minutes}: all {count(self.epochs, 'epoch')} of train.epochs fit (≈ {epoch_s:.0f} s each with evaluation)"
        else:
            line = f"{minutes}: {count(fit, 'epoch')} fit{'s' * (fit == 1)} (≈ {epoch_s:.0f} s each with evaluation)"
            if room < 0:
                over = now_s + this_epoch_s + REPORT_S - self.budget_s
                line += f"; not even one does, so the run trains 1 and ends ≈ {over:.0f} s past the budget"
        self.decided = True
        self.set_epochs(min(fit, self.epochs), step)
        self.notes.append(line)
        return line

    @staticmethod
    def epoch_estimate(rate: float, train_images: int, val_images: int, eval_every: int) -> float:
        """Seconds per epoch at `rate` images/s: training, its share of an evaluation, the epoch's files."""
        return epoch_cost(train_images / rate, val_images * EVAL_COST / rate, eval_every)

    def check(self, *, now_s: float, epochs_done: int, epoch_s: float, step: int) -> Optional[str]:
        """After an epoch: shorten the run when the planned epochs no longer fit at `epoch_s` seconds
        each, never below one more. Returns the line to print, or None when the plan stands."""
        left = self.epochs - epochs_done
        if self.budget_s is None or left <= 0 or now_s + left * epoch_s + REPORT_S <= self.budget_s:
            return None
        fit = max(1, math.floor((self.budget_s - now_s - REPORT_S) / epoch_s))  # fewer than left
        line = f"budget: epochs now take ≈ {epoch_s:.0f} s"
        if fit < left:
            line += (f", so {count(left, 'more epoch')} no longer fit in {self.budget_s / 60:g} min: the run ends "
                     f"after epoch {epochs_done + fit} instead of {self.epochs}, its learning-rate decay compressed "
                     f"onto the epochs left")
            self.set_epochs(epochs_done + fit, step)
        over = now_s + fit * epoch_s + REPORT_S - self.budget_s
        if over > 0:  # one more epoch is the least the learning rate can still decay over
            line += f"; the last epoch will end ≈ {over:.0f} s past the budget of {self.budget_s / 60:g} min"
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
