"""Peak memory of one training step with and without gradient checkpointing, each in a fresh process.

    python benchmarks/grad_checkpoint_memory.py                        # ViT-B/16, batch 32, 224x224, CPU fp32
    python benchmarks/grad_checkpoint_memory.py --preset S/16 --batch 8

The figure is the process's peak resident memory (ru_maxrss) after one forward + backward, minus
what it held before the step (model, batch and interpreter): the activations and gradients the step
kept. Memory does not depend on the machine's load, the step time does (it is printed, not compared).
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP = """
import resource, sys, time, torch
from vit import ViTConfig, ViTForImageClassification
preset, batch, on = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
torch.manual_seed(0)
model = ViTForImageClassification(ViTConfig.from_preset(preset, num_labels=1000)).train()
if on:
    model.gradient_checkpointing_enable()
x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
model(x, labels=y).loss.backward()
step = time.perf_counter() - t
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, step)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="B/16")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    print(f"{args.preset}, batch {args.batch}, 224x224, fp32 on the CPU (load average {os.getloadavg()[0]:.2f})")
    print("| gradient checkpointing | peak RSS | kept by the step | step time |\n|---|---|---|---|")
    for on in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", STEP, args.preset, str(args.batch), on], cwd=ROOT, check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}).stdout.split()
        before, peak, step = (float(v) for v in out[-3:])
        print(f"| {on} | {peak:,.0f} MiB | {peak - before:,.0f} MiB | {step:.0f} s |")


if __name__ == "__main__":
    main()
