"""Interleaved A/B timing of the implementations, for a noisy or shared machine, plus a profile.

bench_models.py times one implementation after another, so anything else the machine does in
between shows up as a difference between them. Here each round runs one step of every
implementation back to back (order rotated each round), and the figure reported is the median
over rounds of the per-round ratio to timm, which cancels slow drifts of the machine.

    python benchmarks/ab.py --model S/16 --batch 8 --rounds 15            # CPU, fp32, inference
    python benchmarks/ab.py --model Ti/16 --phase train --profile         # + torch.profiler tables
    python benchmarks/ab.py --params params.json --phase train --batch 128 --impls ours,timm --precision bf16 --compile
"""

import argparse
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import IMPLS, autocast, build_model, cpu_threads, make_optimizer, sync, train_step


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="S/16")
    p.add_argument("--params", default=None, help="take the model (sizes, image size, channels) from a params.json instead")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="bf16 autocast on the CPU too (default: bf16 on CUDA only)")
    p.add_argument("--compile", action="store_true", help="torch.compile every implementation")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--phase", choices=["infer", "train"], default="infer")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops per implementation")
    p.add_argument("--threads", type=int, default=None, help="intra-op CPU threads (default 1 on the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def model_spec(args):
    """(sizes or preset, image size, channels, classes) from --params or --model."""
    if args.params is None:
        return args.model, 224, 3, 1000
    with open(args.params) as f:
        params = json.load(f)
    m, d = params["model"], params["data"]
    sizes = tuple(m[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size"))
    return sizes, d["image_size"], d["channels"], 10


def make_step(impl, args, device):
    """A closure running one inference or training step of this implementation on fixed random data."""
    torch.manual_seed(0)
    sizes, image_size, channels, classes = model_spec(args)
    model = build_model(impl, sizes, image_size, num_labels=classes, num_channels=channels).to(device)
    runner = torch.compile(model) if args.compile else model
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, channels, image_size, image_size, device=device, generator=g)
    y = torch.randint(0, classes, (args.batch,), device=device, generator=g)
    if args.phase == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast(device, args.precision):
                runner(x)
    else:
        model.train()
        opt = make_optimizer(model, device)

        def step():
            train_step(runner, opt, x, y, device, args.precision)
    return step


def timed(step, device):
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def interleaved(steps, rounds, warmup, device):
    """{impl: [seconds per step, one per round]}: each round runs every step once, order rotated."""
    impls = list(steps)
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            times[impl].append(timed(steps[impl], device))
    return times


def ratio(times, impl, ref):
    """Median over rounds of ref's time / impl's time: > 1 means impl is faster."""
    return statistics.median(a / b for a, b in zip(times[ref], times[impl]))


def main():
    args = parse_args()
    device = torch.device(args.device)
    cpu_threads(device, args.threads)
    impls = args.impls.split(",")
    steps = {impl: make_step(impl, args, device) for impl in impls}
    times = interleaved(steps, args.rounds, args.warmup, device)
    ref = "timm" if "timm" in impls else impls[0]
    what = args.params or args.model
    print(f"{what} {args.phase} batch {args.batch} on {device}, {torch.get_num_threads()} thread(s), {args.rounds} rounds, "
          f"{args.precision or 'default'} precision{', compiled' if args.compile else ''}")
    print(f"{'impl':5} {'median ms':>9} {'min ms':>8} {'img/s (min)':>11} | {'x ' + ref + ' (median of per-round ratios)':>40}")
    for impl in impls:
        print(f"{impl:5} {1e3 * statistics.median(times[impl]):9.1f} {1e3 * min(times[impl]):8.1f} "
              f"{args.batch / min(times[impl]):11.1f} | {ratio(times, impl, ref):40.3f}")
    if args.profile:
        for impl, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
                step()
                step()
            print(f"\n{impl}: two steps")
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
