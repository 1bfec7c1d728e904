"""How a CPU run slows down when other processes share the cores: epoch_s of a recipe (default
configs/cpu_smoke.json) on an idle machine and beside 1 and 2 busy neighbours (`while 1: pass`),
for each OpenMP setting, in interleaved rounds.

    python benchmarks/cpu_contention.py                       # 2 rounds, about 10 minutes on 2 cores
    python benchmarks/cpu_contention.py --rounds 1 --neighbours 0,2

Settings: the default (main.py makes OpenMP threads wait passively), OMP_WAIT_POLICY=ACTIVE (libgomp's
spinning, what torch does when nothing is set), and OMP_NUM_THREADS=1. The slowdown of each is its
median epoch_s over the median idle epoch_s of the default, so every row compares with the same
idle run; the issue's acceptance is at most 2x with one neighbour and 4x with two.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "default (passive)": {},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default=os.path.join(ROOT, "configs", "cpu_smoke.json"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--neighbours", default="0,1,2", help="comma list of busy-process counts")
    return p.parse_args()


def epoch_s(params, env, neighbours):
    """epoch_s of one run of `params` beside `neighbours` busy processes."""
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(neighbours)]
    try:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, "main.py", "--params", params, "--set", f"output.dir={out}/run",
                            "output.misclassified=0"], cwd=ROOT, env={**os.environ, **env}, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(os.path.join(out, "run", "metrics.jsonl")) as f:
                return json.loads(f.readlines()[-1])["epoch_s"]
    finally:
        for p in busy:
            p.kill()
            p.wait()


def main():
    args = parse_args()
    counts = [int(n) for n in args.neighbours.split(",")]
    times = {(name, n): [] for name in SETTINGS for n in counts}
    print(f"{args.params}, {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.rounds):
        for n in counts:
            for name, env in SETTINGS.items():
                times[(name, n)].append(epoch_s(args.params, env, n))
                print(f"  round {r + 1}: {name}, {n} neighbour(s): {times[(name, n)][-1]:.1f} s", flush=True)
    idle = statistics.median(times[("default (passive)", 0)]) if 0 in counts else None
    print("\n| setting | " + " | ".join(f"{n} busy neighbour(s)" for n in counts) + " |")
    print("|---" * (1 + len(counts)) + "|")
    for name in SETTINGS:
        cells = []
        for n in counts:
            t = statistics.median(times[(name, n)])
            cells.append(f"{t:.1f} s" + (f" ({t / idle:.1f}x)" if idle else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
