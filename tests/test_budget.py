"""train.time_budget: the epochs that fit are decided once from the measured speed, the schedule is
sized to them, a slower machine shortens the run without a jump in the learning rate, a resumed run
keeps the decision and stays bit-exact. Fake clocks throughout: time passes only in the model's
forward passes, at a rate each test sets, so nothing here depends on this machine's speed."""

import json
import math

import pytest
import torch

from helpers import make_folder, tiny_params
from vit.model import ViTForImageClassification
from vit.train import budget, loop, optim
from vit.train.budget import Plan


# -----------------------------------------------------------------------------
# the schedule's length


def lr(step, totals, warmup=10):
    return optim.lr_at(step, base_lr=1.0, min_lr=0.0, warmup_steps=warmup, totals=totals)


def test_one_length_is_the_plain_cosine():
    for step in range(0, 130):
        plain = 1.0 if step < 10 else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 10) / 100)))
        expected = (step + 1) / 10 if step < 10 else plain
        assert lr(step, [(0, 110)]) == pytest.approx(expected)


def test_a_shorter_length_compresses_the_rest_of_the_decay_without_a_jump():
    totals = [(0, 110), (60, 90)]  # halfway through the decay the run is cut from 110 to 90 steps
    assert [lr(s, totals) for s in range(60)] == [lr(s, [(0, 110)]) for s in range(60)]  # the past is unchanged
    assert lr(60, totals) == pytest.approx(lr(60, [(0, 110)]))  # no jump at the cut
    assert optim.decay_progress(75, 10, totals) == pytest.approx(0.75)  # the other half over 30 steps
    assert lr(90, totals) == 0.0 and lr(200, totals) == 0.0  # the floor at the new end
    assert all(lr(s, totals) >= lr(s + 1, totals) for s in range(10, 120))
    # cut twice, and cut during the warm-up: the decay starts from 0 at the warm-up's end
    assert optim.decay_progress(80, 10, [(0, 110), (60, 90), (70, 80)]) == 1.0
    assert [lr(s, [(0, 1000), (5, 110)]) for s in range(120)] == [lr(s, [(0, 110)]) for s in range(120)]


# -----------------------------------------------------------------------------
# deciding and checking, in numbers


def decide(budget_min=15, epochs=20, rate=1000.0, now_s=20.0, **kw):
    plan = Plan.start(epochs, 100, budget_min)
    line = plan.decide(now_s=now_s, step=35, rate=rate, train_images=60000, val_images=10000, eval_every=1,
                       images_left=kw.pop("images_left", 55000), **kw)
    return plan, line


def test_the_decision_counts_setup_training_evaluation_files_and_the_report():
    plan, line = decide()
    epoch_s = 60000 / 1000 + 10000 / 3 / 1000 + budget.EPOCH_OVERHEAD_S  # 64.3 s
    this_epoch = 55 + 10 / 3 + budget.EPOCH_OVERHEAD_S
    expected = 1 + math.floor((budget.SAFETY * (900 - 20 - budget.REPORT_S) - this_epoch) / epoch_s)
    assert plan.epochs == expected == 13 and plan.decided
    assert line == "budget 15 min: 13 epochs fit (≈ 64 s each with evaluation)"
    assert plan.totals == [(0, 2000), (35, 1300)] and plan.notes == [line]
    # the whole run fits: the projection of every epoch plus the report stays inside the budget
    assert 20 + this_epoch + (plan.epochs - 1) * epoch_s + budget.REPORT_S <= 900


def test_the_decision_never_goes_past_train_epochs_nor_below_one_epoch():
    plan, line = decide(rate=100000.0)
    assert plan.epochs == 20 and plan.totals == [(0, 2000)] and "all 20 epochs of train.epochs fit" in line
    plan, line = decide(budget_min=0.5)
    assert plan.epochs == 1 and "not even one does, so the run trains 1 and ends" in line and "past the budget" in line


def test_a_slower_machine_shortens_the_run_and_says_so_never_below_one_more_epoch():
    plan, _ = decide()  # 13 epochs of ~64 s
    assert plan.check(now_s=20 + 3 * 64.3, epochs_done=3, epoch_s=64.3, step=300) is None  # on plan
    line = plan.check(now_s=20 + 4 * 64.3, epochs_done=4, epoch_s=90.0, step=400)  # 40% slower from here
    assert plan.epochs == 4 + math.floor((900 - 20 - 4 * 64.3 - budget.REPORT_S) / 90.0) == 10
    assert plan.totals[-1] == (400, 1000) and "the run ends after epoch 10 instead of 13" in line
    assert "past the budget" not in line
    # much slower near the end: one more epoch is the least, and the overrun is said
    line = plan.check(now_s=850, epochs_done=8, epoch_s=90.0, step=800)
    assert plan.epochs == 9 and "past the budget of 15 min" in line
    # faster again: a run never lengthens
    assert plan.check(now_s=860, epochs_done=8, epoch_s=1.0, step=800) is None and plan.epochs == 9


def test_a_resumed_plan_is_kept_lifted_with_a_null_budget_or_kept_with_a_note():
    plan, _ = decide()
    state = json.loads(json.dumps(plan.state_dict()))  # what last.pt holds, through plain types
    kept, note = Plan.resumed(state, 100, 20, 15)
    assert kept == Plan.from_state(state, 100) and kept.totals == plan.totals and note is None
    kept, note = Plan.resumed(state, 100, 20, 30)
    assert kept.epochs == 13 and "train.time_budget is 30 min now" in note and "the plan is kept" in note
    lifted, note = Plan.resumed(state, 100, 25, None)
    assert lifted.epochs == 25 and lifted.totals == [(0, 2500)] and lifted.budget_s is None
    assert "time budget of 15 min lifted" in note
    assert Plan.resumed(None, 100, 7, 15) == (Plan.start(7, 100, None), None)  # a checkpoint from before plans


# -----------------------------------------------------------------------------
# the run, on a fake clock


class Clock:
    """Seconds that pass only in forward passes: `train_s` per training batch, `eval_s` per evaluated one."""

    def __init__(self, train_s=1.0, eval_s=0.25):
        self.t, self.train_s, self.eval_s, self.forwards = 0.0, train_s, eval_s, 0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    clock, forward = Clock(), ViTForImageClassification.forward

    def timed_forward(model, *args, **kw):
        clock.forwards += model.training
        clock.t += clock.train_s if model.training else clock.eval_s
        return forward(model, *args, **kw)

    monkeypatch.setattr(ViTForImageClassification, "forward", timed_forward)
    return clock


def budget_run(tmp_path, clock, budget_min=1.0, **train):
    """A tiny folder run of 40 batches per epoch (batch 1) under `clock`; returns (code, run folder, its printed text)."""
    make_folder(tmp_path / "images", classes=2, per_class=26, size=16)
    params = tiny_params(tmp_path, tmp_path / "images", epochs=20, batch_size=1, time_budget=budget_min,
                         warmup_epochs=0.5, **train)
    return params, tmp_path / "run"


def history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_budgeted_run_decides_once_and_ends_inside_its_budget(tmp_path, clock, capsys):
    torch.set_num_threads(1)
    params, run = budget_run(tmp_path, clock)
    assert loop.train(params, clock=clock, launched=0.0) == 0
    out = capsys.readouterr().out
    plan = torch.load(run / "last.pt", weights_only=True)["plan"]
    # 40 s of training and 12 x 0.25 s of evaluation per epoch, decided 36 s in: one epoch fits in a minute
    assert "speed: 1 images/s on the CPU (1 thread, fp32); budget 1 min: 1 epoch fits (≈ 45 s each with evaluation)" in out
    assert plan["epochs"] == 1 and plan["decided"] and len(plan["notes"]) == 1 and plan["notes"][0] in out
    assert [h["epoch"] for h in history(run)] == [1] and history(run)[-1]["elapsed_s"] <= 60
    assert "within the time budget of 1 min" in out


def test_the_decision_sizes_the_schedule_and_the_lr_ends_at_its_floor(tmp_path, clock, capsys):
    torch.set_num_threads(1)
    params, run = budget_run(tmp_path, clock, budget_min=4.0)
    assert loop.train(params, clock=clock, launched=0.0) == 0
    out = capsys.readouterr().out
    plan = torch.load(run / "last.pt", weights_only=True)["plan"]
    # decided after 36 batches: 0.98 x (240 - 36 - 10) s, less this epoch's 9, leaves 4 more epochs of 45 s
    assert "budget 4 min: 5 epochs fit (≈ 45 s each with evaluation)" in out, out
    assert plan["epochs"] == 5 and plan["totals"] == [[0, 800], [36, 200]]
    h = history(run)
    assert len(h) == 5 and h[-1]["elapsed_s"] <= 240 and h[-1]["lr"] == pytest.approx(1e-5, rel=0.2)


def test_a_machine_that_slows_down_shortens_the_run_and_stays_inside_the_budget(tmp_path, clock, capsys, monkeypatch):
    torch.set_num_threads(1)
    params, run = budget_run(tmp_path, clock, budget_min=6.0)
    real_check = budget.Plan.check

    def slower_after_two(plan, **kw):  # from the third epoch on, every training batch takes twice as long
        clock.train_s = 2.0 if kw["epochs_done"] >= 2 else clock.train_s
        return real_check(plan, **kw)

    monkeypatch.setattr(budget.Plan, "check", slower_after_two)
    assert loop.train(params, clock=clock, launched=0.0) == 0
    out = capsys.readouterr().out
    assert "budget 6 min: 7 epochs fit" in out, out
    assert "budget: epochs now take ≈ 84 s, so 4 more epochs no longer fit in 6 min: the run ends after epoch 5 instead of 7" in out
    h = history(run)
    assert len(h) == 5 and h[-1]["elapsed_s"] <= 360 and h[-1]["lr"] == pytest.approx(1e-5, rel=0.2)
    assert all(a["lr"] >= b["lr"] for a, b in zip(h, h[1:]))


def test_a_resumed_budget_run_keeps_its_plan_and_is_bit_exact(tmp_path, clock, capsys, monkeypatch):
    """Stopped by SIGINT in its second epoch and resumed on a fake clock that runs on: the same plan,
    no second decision, and the weights of the uninterrupted run."""
    import os
    import signal

    from vit.loading.project import read_training_checkpoint
    from vit.train import engine

    torch.set_num_threads(1)
    params, run = budget_run(tmp_path / "a", clock, budget_min=4.0, drop_path=0.1)
    assert loop.train(params, clock=clock, launched=0.0) == 0
    reference = read_training_checkpoint(str(run / "last.pt"))
    capsys.readouterr()

    clock.t = 0.0
    params, run = budget_run(tmp_path / "b", clock, budget_min=4.0, drop_path=0.1)
    real, calls = engine.set_lr, []

    def sigint_at_step_60(*args):
        calls.append(1)
        if len(calls) == 60:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(engine, "set_lr", sigint_at_step_60)
    assert loop.train(params, clock=clock, launched=0.0) == 128 + signal.SIGINT
    monkeypatch.setattr(engine, "set_lr", real)
    assert loop.train(params, resume=True, clock=clock, launched=clock()) == 0
    out = capsys.readouterr().out
    assert out.count("epochs fit") == 1 and "of 5 (planned within the time budget of 4 min)" in out
    resumed = read_training_checkpoint(str(run / "last.pt"))
    assert resumed["plan"] == reference["plan"]
    for k in reference["model"]:
        assert torch.equal(resumed["model"][k], reference["model"][k]), k
