"""train.time_budget: the epochs that fit are decided once from the measured speed, the schedule is
sized to them, a slower machine shortens the run without a jump in the learning rate, a resumed run
keeps the decision and stays bit-exact. Fake clocks throughout: time passes only in the model's
forward passes, at a rate each test sets, so nothing here depends on this machine's speed."""

import json
import math

import pytest
import torch

from helpers import make_folder, tiny_params
from vit import precision
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


EVAL_S = 10000 / 3 / 1000  # 10,000 test images at a third of the cost of 1,000 trained images/s


def decide(budget_min=15, epochs=20, epoch_train_s=60.0, now_s=20.0, **dropout):
    """A Fashion-MNIST-sized decision: 60 s an epoch, 55 s of the first still to go, 20 s after launch."""
    plan = Plan.start(epochs, 100, budget_min, **dropout)
    line = plan.decide(now_s=now_s, step=35, epoch_train_s=epoch_train_s, left_s=epoch_train_s * 55 / 60,
                       eval_s=EVAL_S, eval_every=1)
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


def test_epochs_that_drop_patches_cost_their_share_and_more_of_them_fit():
    # the first half of the epochs drop half the patches: measured on such an epoch, a full one takes twice as long
    plan, line = decide(epoch_train_s=30.0, drop_until=0.5, drop_share=0.5)
    full, half = 60 + EVAL_S + budget.EPOCH_OVERHEAD_S, 30 + EVAL_S + budget.EPOCH_OVERHEAD_S
    room = budget.SAFETY * (900 - 20 - budget.REPORT_S) - (27.5 + EVAL_S + budget.EPOCH_OVERHEAD_S)
    assert plan.epochs == 17 and plan.drop_epochs() == 9  # epochs 1-8 cost `half`, 9-16 cost `full`
    assert 8 * half + 8 * full <= room < 8 * half + 9 * full  # after the first: 17 epochs fit, 18 would not
    assert "budget 15 min: 17 epochs fit" in line and "the first 9 drop patches" in line
    assert [plan.share(e) for e in (0, 8, 9, 16)] == [0.5, 0.5, 1.0, 1.0]
    assert plan.drop_epochs(10) == 5 and Plan.start(10, 1, None).drop_epochs() == 0


def test_the_decision_never_goes_past_train_epochs_nor_below_one_epoch():
    plan, line = decide(epoch_train_s=0.6)
    assert plan.epochs == 20 and plan.totals == [(0, 2000)] and "all 20 epochs of train.epochs fit" in line
    plan, line = decide(budget_min=0.5)
    assert plan.epochs == 1 and "not even one does, so the run trains 1 and ends" in line and "past the budget" in line


def test_a_slower_machine_shortens_the_run_and_says_so_never_below_one_more_epoch():
    plan, _ = decide()  # 13 epochs of ~64 s
    def check(now_s, done, epoch_s):  # an epoch of `epoch_s` seconds with its evaluation and files
        return plan.check(now_s=now_s, epochs_done=done, train_s=epoch_s - EVAL_S - budget.EPOCH_OVERHEAD_S,
                          eval_s=EVAL_S, eval_every=1, step=100 * done)

    assert check(20 + 3 * 64.3, 3, 64.3) is None  # on plan
    line = check(20 + 4 * 64.3, 4, 90.0)  # 40% slower from here
    assert plan.epochs == 4 + math.floor((900 - 20 - 4 * 64.3 - budget.REPORT_S) / 90.0) == 10
    assert plan.totals[-1] == (400, 1000) and "past the budget" not in line
    assert line == ("budget: an epoch now takes ≈ 90 s on all patches, so 9 more epochs no longer fit in 15 min: "
                    "the run ends after epoch 10 instead of 13, its learning-rate decay compressed onto the epochs left")
    # much slower near the end: one more epoch is the least, and the overrun is said
    line = check(850, 8, 90.0)
    assert plan.epochs == 9 and line.endswith("the last epoch will end ≈ 50 s past the budget of 15 min")
    # faster again: a run never lengthens
    assert check(860, 8, 5.0) is None and plan.epochs == 9


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
    train = {"patch_dropout": 0.0, **train}  # the fake clock charges a forward pass the same whatever its tokens
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
    assert "budget: an epoch now takes ≈ 84 s on all patches, so 4 more epochs no longer fit in 6 min: the run ends after epoch 5 instead of 7" in out
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


# -----------------------------------------------------------------------------
# patch dropout


def test_patch_dropout_keeps_the_prefix_and_a_random_share_of_the_patches_while_training():
    from vit.layers import PatchDropout

    x = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)  # 1 class token + 16 patches, width 3
    drop = PatchDropout(num_prefix_tokens=1, prob=0.5).train()
    y = drop(x)
    assert y.shape == (2, 9, 3) and torch.equal(y[:, 0], x[:, 0])
    for b in range(2):  # every kept token is one of the image's own patches, none twice
        kept = {tuple(t.tolist()) for t in y[b, 1:]}
        assert len(kept) == 8 and kept <= {tuple(t.tolist()) for t in x[b, 1:]}
    assert torch.equal(drop.eval()(x), x) and torch.equal(PatchDropout(1).train()(x), x)


def test_the_run_drops_patches_in_the_planned_first_epochs_only(tmp_path, monkeypatch):
    from vit.layers import PatchDropout

    torch.set_num_threads(1)
    make_folder(tmp_path / "images", classes=2, per_class=8, size=16)
    params = tiny_params(tmp_path, tmp_path / "images", epochs=4, batch_size=4, patch_dropout=0.5, patch_dropout_until=0.5)
    tokens, forward = [], PatchDropout.forward

    def counting(module, x):
        y = forward(module, x)
        if module.training:
            tokens.append(y.shape[1])
        return y

    monkeypatch.setattr(PatchDropout, "forward", counting)
    monkeypatch.setattr(precision, "interleaved_steps", lambda *a: ({"all": 1.0, "drop": 0.6}, 4))  # the probe's copy counts no tokens
    assert loop.train(params) == 0
    per_epoch = len(tokens) // 4
    # 16 patches of 4x4 in a 16x16 image: the first 2 of 4 epochs keep 8 of them, the last 2 all
    assert tokens == [1 + 8] * (2 * per_epoch) + [1 + 16] * (2 * per_epoch)


def test_patch_dropout_says_it_does_not_apply_to_a_frozen_backbone():
    train = {"patch_dropout": 0.5, "patch_dropout_until": 0.5, "freeze_backbone": True}
    plan = Plan.start(10, 5, None, **budget.dropout_plan(train))
    assert plan.drop_epochs() == 0 and "patch_dropout does not apply" in budget.start_line(plan, train)
    plan = Plan.start(10, 5, 15, drop_until=0.5, drop_share=0.52)
    line = budget.start_line(plan, {**train, "freeze_backbone": False})
    assert line == ("time budget 15 min: how many of train.epochs=10 fit is decided a few dozen steps in; patch dropout: "
                    "the first 50% of the epochs train on 50% of each image's patches (a forward and backward pass timed 1.92x faster)")


def test_what_a_dropping_step_costs_is_timed_on_a_copy_and_kept_in_the_plan():
    from vit.config import ViTConfig

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=2))
    train = {"patch_dropout": 0.5, "patch_dropout_until": 0.5, "freeze_backbone": False}
    before = torch.random.get_rng_state()
    dropout = budget.dropout_plan(train, model, (4, 3, 16, 16), torch.device("cpu"), "fp32")
    assert dropout["drop_until"] == 0.5 and 0.0 < dropout["drop_share"] <= 1.0
    assert model.vit.patch_drop.prob == 0.0 and torch.equal(torch.random.get_rng_state(), before)  # the run is untouched
    # a resumed run keeps the share its start timed, not the token share params give, so it judges alike
    state = Plan.start(10, 5, 15, drop_until=0.5, drop_share=0.69).state_dict()
    assert Plan.from_state(state, 5, **budget.dropout_plan(train)).drop_share == 0.69
    # a step that drops patches no faster still drops them: the share says what it costs, not whether it runs
    assert Plan.start(10, 5, None, drop_until=0.5, drop_share=1.0).drop_epochs() == 5


def test_the_run_settles_what_a_dropping_epoch_costs_from_its_own_speed():
    # dropping patches saves 2 ms an image in the forward and backward passes (timed); the run trains
    # 250 images/s while dropping: 4 ms an image, so 6 ms on all patches, whatever the probe's own ratio
    plan = Plan.start(10, 5, 15, drop_until=0.5, drop_share=0.5, drop_saving=0.002)
    plan.settle_share(0, 250.0)
    assert plan.drop_share == pytest.approx(4 / 6)
    plan = Plan.start(10, 5, 15, drop_until=0.5, drop_share=0.5, drop_saving=0.002)
    plan.settle_share(7, 1000 / 6)  # measured in an epoch on all patches: 6 ms, of which 2 would be saved
    assert plan.drop_share == pytest.approx(4 / 6)
    untimed = Plan.start(10, 5, 15, drop_until=0.5, drop_share=0.5)
    untimed.settle_share(0, 250.0)
    assert untimed.drop_share == 0.5
    kept = Plan.from_state(plan.state_dict(), 5, drop_until=0.5, drop_share=0.5, drop_saving=0.0)
    assert (kept.drop_share, kept.drop_saving) == (plan.drop_share, 0.002)


def test_the_first_whole_epoch_lengthens_the_plan_once_when_more_epochs_fit():
    plan, _ = decide()  # 13 epochs of ~64 s, from the few dozen steps the decision saw
    assert not plan.revised
    # the whole first epoch ran faster (40 s of training): more epochs fit, up to train.epochs (20)
    line = plan.check(now_s=20 + 44.3, epochs_done=1, train_s=40.0, eval_s=EVAL_S, eval_every=1, step=100)
    room = budget.SAFETY * (900 - 20 - 44.3 - budget.REPORT_S)
    assert plan.revised and plan.epochs == min(20, 1 + math.floor(room / (40 + EVAL_S + budget.EPOCH_OVERHEAD_S))) == 19
    assert plan.totals[-1] == (100, 1900) and "so 19 epochs fit, not 13" in line and "stretched" in line
    assert [lr(s, plan.totals) for s in range(101)] == [lr(s, plan.totals[:2]) for s in range(101)]  # the past unchanged
    # once: a later, faster epoch does not lengthen it again
    assert plan.check(now_s=20 + 2 * 44.3, epochs_done=2, train_s=20.0, eval_s=EVAL_S, eval_every=1, step=200) is None
    assert plan.epochs == 19
    # a slower first epoch is left to the later checks, which see fresh speeds: the revision only lengthens
    slow, _ = decide()
    assert slow.check(now_s=20 + 94.3, epochs_done=1, train_s=90.0, eval_s=EVAL_S, eval_every=1, step=100) is None
    assert slow.epochs == 13 and slow.revised
    line = slow.check(now_s=20 + 2 * 94.3, epochs_done=2, train_s=90.0, eval_s=EVAL_S, eval_every=1, step=200)
    assert slow.epochs == 9 and "the run ends after epoch 9 instead of 13" in line
    # a checkpoint from before the revision existed does not revise
    state = {k: v for k, v in Plan.start(13, 100, 15).state_dict().items() if k != "revised"}
    assert Plan.from_state(state, 100).revised
