"""The default recipe against a naive baseline on this CPU, in one run so that the day's speed cancels.

    python benchmarks/cpu_time_to_accuracy.py                  # both runs (2 x 15 min), the step's efficiency, the speed ratios
    python benchmarks/cpu_time_to_accuracy.py --budget 300     # shorter: both runs get 5 minutes
    python benchmarks/cpu_time_to_accuracy.py --skip-runs      # only the step's efficiency and the speed ratios (minutes)

In one process on one machine, one after the other, each with the same wall budget:
1. ours: `python main.py --params P --set train.time_budget=BUDGET` from launch (interpreter, imports,
   data, model, evaluation all count), read from its metrics.jsonl (elapsed_s and the accuracy that
   picks its best model, output.best_metric, after every epoch);
2. a naive baseline: timm's VisionTransformer of the same size in a plain fp32 loop as a user would
   first write it (AdamW lr 1e-3, batch 128, warm-up + cosine sized to the same wall budget, random
   flip, label smoothing 0.1, torch's default threads and OpenMP settings), evaluated on the same
   10k test images after every epoch, with its clock started at this function's first line (the
   imports are already done, which favours the baseline by a few seconds).
The table: test accuracy at 5, 10 and 15 minutes (the last evaluation finished by then), the time
each reaches 85% and 90%, and the time each reaches the baseline's best accuracy: how much sooner
ours gets to what the naive loop ends with.

Then the default training step's efficiency: its FLOPs (counted by torch.utils.flop_counter) per
second, against the rate of a 4096x256x1024 matmul in the same precision (bf16 where this CPU runs it
natively, else fp32), the two timed in alternating rounds so that both see the same machine.
Then model-only training-step images/s, ours over timm, eager and compiled, fp32 and bf16, as the
median of per-round ratios from interleaved steps (benchmarks/ab.py).
The load average is printed before and after each part: on a shared machine only parts measured under
the same load compare.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ab import interleaved, make_step, model_spec, ratio
from common import ROOT, build_model

from vit.data.fashion_mnist import load_fashion_mnist  # noqa: E402  (common puts the repository on sys.path)

MARKS_S = (300, 600, 900)
TARGETS = (0.85, 0.90)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default=os.path.join(ROOT, "params.json"), help="the recipe (default params.json)")
    p.add_argument("--budget", type=float, default=900, help="wall seconds for each run (default 900)")
    p.add_argument("--skip-runs", action="store_true", help="only the model-only speed ratios")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds per speed ratio")
    p.add_argument("--batch", type=int, default=None, help="batch of the speed ratios (default the recipe's)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "cpu_time_to_accuracy.json"))
    return p.parse_args()


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_ours(params_path, budget, metric):
    """[(elapsed_s, metric), ...] of `python main.py` with the time budget `budget` (seconds), stopped
    (SIGTERM) if it ran a minute past it."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "main.py", "--params", params_path, "--set", f"output.dir={out}/run",
               f"train.time_budget={budget / 60:g}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=budget + 60)  # it keeps its budget; the margin only catches a run that does not
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
        with open(os.path.join(out, "run", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return [(r["elapsed_s"], r[metric]) for r in records if metric in r]


def run_baseline(params_path, budget):
    """[(elapsed_s, val_acc), ...] of the naive fp32 loop on timm's VisionTransformer, within `budget` s."""
    started = time.perf_counter()
    torch.manual_seed(0)
    sizes, image_size, channels, classes = model_spec(SimpleNamespace(params=params_path))
    model = build_model("timm", sizes, image_size, num_labels=classes, num_channels=channels)
    (x_train, y_train), (x_test, y_test) = (
        (torch.from_numpy(x.copy())[:, None].float().div(255).sub(0.286).div(0.353), torch.from_numpy(y))
        for x, y in (load_fashion_mnist("train"), load_fashion_mnist("val")))
    batch, lr = 128, 1e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = len(x_train) // batch
    # the schedule must end inside the budget: measure the speed over a few steps, then size it
    total_steps, warmup, step, points = None, 0, 0, []
    for epoch in range(10**6):
        model.train()
        perm = torch.randperm(len(x_train))
        for b in range(steps_per_epoch):
            idx = perm[b * batch:(b + 1) * batch]
            x, y = x_train[idx], y_train[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)  # random horizontal flip
            if total_steps is not None:
                progress = (step - warmup) / max(1, total_steps - warmup)
                for g in opt.param_groups:
                    g["lr"] = lr * (step + 1) / warmup if step < warmup else lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 20:  # training plus one evaluation (a third of a step per image) per epoch
                per_step = (time.perf_counter() - started) / step
                epoch_s = per_step * steps_per_epoch * (1 + len(x_test) / (3 * len(x_train)))
                total_steps = int((budget - (time.perf_counter() - started)) / epoch_s * steps_per_epoch) + step
                warmup = steps_per_epoch // 2
            if step >= (total_steps or 10**12):
                break
        model.eval()
        with torch.no_grad():
            correct = sum((model(x_test[i:i + 500]).argmax(-1) == y_test[i:i + 500]).sum().item()
                          for i in range(0, len(x_test), 500))
        points.append((time.perf_counter() - started, correct / len(x_test)))
        print(f"  baseline epoch {epoch + 1}: test accuracy {points[-1][1]:.4f} at {points[-1][0]:.0f} s", flush=True)
        if step >= total_steps or time.perf_counter() - started > budget:
            return points


def at(points, seconds):
    """The accuracy of the last evaluation finished by `seconds`, or None."""
    done = [acc for t, acc in points if t <= seconds]
    return done[-1] if done else None


def reaches(points, target):
    """Seconds until the first evaluation at or above `target`, or None."""
    return next((t for t, acc in points if acc >= target), None)


def step_efficiency(params_path, rounds):
    """(precision, FLOPs of one training step, [seconds per step], [matmul FLOP/s]): the default recipe's
    training step (model, loss, backward, clipping, AdamW, as vit/train/engine.py runs it) in the
    precision `auto` takes on this CPU, and a matmul of that precision, timed in alternating rounds."""
    import statistics

    from torch.utils.flop_counter import FlopCounterMode

    from vit import factory, precision
    from vit import params as P
    from vit.train import engine, optim

    cpu, params = torch.device("cpu"), P.load(params_path)
    t, d = params["train"], params["data"]
    prec = "bf16" if precision.cpu_has_native_bf16() else "fp32"
    torch.manual_seed(0)
    model = factory.build_model(params, [str(c) for c in range(10)]).train()
    optimizer = optim.build_optimizer(model, t, cpu)
    x = torch.randn(t["batch_size"], d["channels"], d["image_size"], d["image_size"])
    y = torch.randint(0, 10, (t["batch_size"],))

    def forward_backward():
        with precision.autocast(cpu, prec):
            logits = model(x).logits
        engine.loss_fn(logits, y, t["label_smoothing"]).backward()

    def step():
        forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["clip_grad"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        forward_backward()
    model.zero_grad(set_to_none=True)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    a, b = torch.randn(4096, 256, dtype=dtype), torch.randn(256, 1024, dtype=dtype)
    mm_flops = 2 * 4096 * 256 * 1024
    for _ in range(3):
        step()
        a @ b
    step_s, peak = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        step_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        peak.append(10 * mm_flops / (time.perf_counter() - t0))
    achieved = counter.get_total_flops() / statistics.median(step_s)
    print(f"  {prec} step: {counter.get_total_flops() / 1e9:.2f} GFLOP in {1e3 * statistics.median(step_s):.0f} ms "
          f"(median of {rounds}) = {achieved / 1e9:.0f} GFLOP/s; {prec} matmul peak {statistics.median(peak) / 1e9:.0f} "
          f"GFLOP/s: {achieved / statistics.median(peak):.0%} of it", flush=True)
    return prec, counter.get_total_flops(), step_s, peak


def speed_ratios(params_path, batch, rounds):
    """{(mode, precision): ours/timm training-step speed}, median of per-round ratios."""
    out = {}
    for compile_ in (False, True):
        for precision in ("fp32", "bf16"):
            args = SimpleNamespace(params=params_path, model=None, phase="train", batch=batch, precision=precision,
                                   compile=compile_)
            steps = {impl: make_step(impl, args, torch.device("cpu")) for impl in ("ours", "timm")}
            times = interleaved(steps, rounds, warmup=3, device=torch.device("cpu"))
            key = ("compiled" if compile_ else "eager", precision)
            out[key] = (ratio(times, "ours", "timm"), batch / min(times["ours"]), batch / min(times["timm"]))
            print(f"  {key[0]} {precision}: ours {out[key][1]:.0f} img/s, timm {out[key][2]:.0f} img/s, ratio {out[key][0]:.3f}", flush=True)
    return out


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def seconds(x):
    return "never" if x is None else f"{x:.0f} s"


def race(ours, base, budget):
    """The table of both runs and the ratios of their times to the same accuracy."""
    marks = [m for m in MARKS_S if m <= budget] or [budget]
    goal = max(acc for _, acc in base) if base else None
    head = " | ".join(f"acc @ {m / 60:g} min" for m in marks)
    print(f"\n| run | {head} | " + " | ".join(f"time to {t:.0%}" for t in TARGETS)
          + f" | time to the baseline's best ({fmt(goal, '.4f')}) |")
    print("|---" * (2 + len(marks) + len(TARGETS)) + "|")
    for name, points in (("ours (params.json)", ours), ("naive timm fp32 loop", base)):
        print(f"| {name} | " + " | ".join(fmt(at(points, m), ".4f") for m in marks) + " | "
              + " | ".join(seconds(reaches(points, t)) for t in TARGETS) + f" | {seconds(reaches(points, goal))} |")
    for what, target in [*((f"{t:.0%}", t) for t in TARGETS), ("the baseline's best", goal)]:
        a, b = reaches(ours, target), reaches(base, target)
        print(f"time to {what}, baseline / ours: " + (f"{b / a:.2f}x" if a and b else
              "baseline never reached it" if a else "ours never reached it"))


def main():
    args = parse_args()
    with open(args.params) as f:
        params = json.load(f)
    results = {"params": args.params, "budget_s": args.budget, "threads": torch.get_num_threads()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    def save():  # after every part: a later part that fails (a compile, say) keeps what came before
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)

    if not args.skip_runs:
        metric = params.get("output", {}).get("best_metric", "val_acc")
        print(f"ours: python main.py --params {args.params} (load average {load_average()})", flush=True)
        ours = run_ours(args.params, args.budget, metric)
        print(f"baseline: timm VisionTransformer, plain fp32 loop (load average {load_average()})", flush=True)
        base = run_baseline(args.params, args.budget)
        print(f"done (load average {load_average()})")
        results.update(ours=ours, baseline=base)
        save()
        race(ours, base, args.budget)
    print(f"\nthe default training step against a matmul, alternating (load average {load_average()}):")
    prec, flops, step_s, peak = step_efficiency(args.params, args.rounds * 3)
    results["efficiency"] = {"precision": prec, "flops": flops, "step_s": step_s, "matmul_flop_s": peak}
    save()
    print(f"\nmodel-only training step, ours / timm (load average {load_average()}):")
    ratios = speed_ratios(args.params, args.batch or params["train"]["batch_size"], args.rounds)
    results["speed"] = {f"{mode} {prec}": v for (mode, prec), v in ratios.items()}
    print("\n| mode | precision | ours img/s | timm img/s | ours / timm |\n|---|---|---|---|---|")
    for (mode, prec), (r, ours_ips, timm_ips) in ratios.items():
        print(f"| {mode} | {prec} | {ours_ips:.0f} | {timm_ips:.0f} | {r:.3f} |")
    save()


if __name__ == "__main__":
    main()
