"""Time to accuracy: run `python main.py` on a recipe and report when val_acc first reaches a target.

    python benchmarks/time_to_accuracy.py --params configs/fmnist_speedrun.json --target 0.95   # issue 4, GPU
    python benchmarks/time_to_accuracy.py --params configs/cpu_smoke.json --target 0.70        # CPU check

The clock is the wall clock from launching the command (interpreter, imports, data, model and
torch.compile all count) to the moment the epoch line that reaches the target lands in
metrics.jsonl (written after that epoch's checkpoint), polled every 0.1 s. The run itself goes on to
its last epoch; its output is shown as it comes. Prints a table per epoch and writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", required=True, help="the recipe (a params.json file)")
    p.add_argument("--target", type=float, required=True, help="val_acc to reach, e.g. 0.95")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for main.py, key=value")
    p.add_argument("--run-dir", default=None, help="output.dir of the run (default: a fresh temporary folder)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "time_to_accuracy.json"))
    return p.parse_args()


def read_lines(path):
    """The complete JSON lines of metrics.jsonl so far (it is replaced atomically, so never half-written)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def main():
    args = parse_args()
    run_dir = args.run_dir or os.path.join(tempfile.mkdtemp(prefix="tta_"), "run")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--params", args.params,
           "--set", f"output.dir={run_dir}", *args.set]
    print("running:", " ".join(cmd), flush=True)
    launched = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    seen, reached = 0, None  # epochs seen so far; (epoch, wall seconds) of the first line at the target
    while True:
        done = proc.poll() is not None
        lines = read_lines(metrics)
        now = time.perf_counter() - launched
        for line in lines[seen:]:
            if reached is None and line.get("val_acc", -1) >= args.target:
                reached = (line["epoch"], now)
        seen = len(lines)
        if done:
            break
        time.sleep(0.1)
    total = time.perf_counter() - launched

    print(f"\n{'epoch':>5} {'val_acc':>8} {'epoch_s':>8} {'elapsed_s':>9}")
    for line in lines:
        print(f"{line['epoch']:5d} {line.get('val_acc', float('nan')):8.4f} {line.get('epoch_s', float('nan')):8.2f} "
              f"{line.get('elapsed_s', float('nan')):9.2f}")
    best = max((line.get("val_acc", -1) for line in lines), default=-1)
    if reached:
        summary = f"reached val_acc >= {args.target} at epoch {reached[0]}, {reached[1]:.1f} s after launch"
    else:
        summary = f"did not reach val_acc >= {args.target} (best {best:.4f})"
    print(f"{summary}; the whole command took {total:.1f} s, exit code {proc.returncode}")
    result = {"command": cmd, "target": args.target, "reached_epoch": reached and reached[0],
              "reached_s": reached and reached[1], "best_val_acc": best, "total_s": total,
              "exit_code": proc.returncode, "metrics": lines}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
