"""Inference and training throughput of this project's ViT, timm's and transformers', in one process.

For each model size, implementation (ours / timm / hf with sdpa) and mode (eager / torch.compile) it
measures inference img/s and training-step img/s (forward, backward, AdamW step), MFU from FLOPs
counted by torch against a matmul peak timed in the same run, and peak memory. bf16 autocast on
CUDA, fp32 on the CPU. One failing case (compile error, OOM) is recorded as failed; the rest go on.

    python benchmarks/bench_models.py                         # GPU: S/16, B/16, L/16, eager + compile
    python benchmarks/bench_models.py --models B/16 --out benchmarks/out/b16.json
    python benchmarks/bench_models.py --small                 # CPU smoke size: Ti/16 + S/16, batch 8
"""

import argparse
import contextlib
import gc
import json
import os
import statistics
import traceback

import torch

from common import IMPLS, autocast, build_model, count_flops, cpu_threads, environment, make_optimizer, matmul_peak, time_calls, train_step

# per size, (inference batch, training batch) that fill an 80 GB H100 without running out of memory
GPU_BATCHES = {"Ti/16": (1024, 512), "S/16": (1024, 512), "B/16": (512, 256), "L/16": (256, 128)}
SMALL_BATCH = 8
FLOPS = {}  # (model, impl, phase, batch) -> FLOPs per step, counted once and reused by later rounds


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="comma list of presets (default S/16,B/16,L/16; --small: Ti/16,S/16)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list from ours,timm,hf")
    p.add_argument("--modes", default=None, help="comma list from eager,compile (default both on CUDA, eager on CPU)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode: default, max-autotune, reduce-overhead, ...")
    p.add_argument("--sdpa", default=None, choices=["flash", "cudnn", "efficient", "math"], help="force one SDPA backend")
    p.add_argument("--batch-infer", type=int, default=None, help="inference batch (default per size, see GPU_BATCHES)")
    p.add_argument("--batch-train", type=int, default=None, help="training batch (default per size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 30, 3 with --small)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10, 1 with --small)")
    p.add_argument("--rounds", type=int, default=None, help="sweeps over all cases, order rotated each sweep; the median sweep is kept (default 1)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--small", action="store_true", help="CPU smoke size: Ti/16 and S/16 at batch 8, few steps")
    p.add_argument("--stat", choices=["median", "min"], default=None,
                   help="per-step statistic for img/s (default median on CUDA; min on the CPU, where other jobs only add time)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (default 1 on the CPU, see common.cpu_threads)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/out/bench_models.json", help="JSON results, rewritten after every case")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.models = (args.models or ("Ti/16,S/16" if args.small else "S/16,B/16,L/16")).split(",")
    args.impls = args.impls.split(",")
    args.modes = (args.modes or ("eager,compile" if cuda else "eager")).split(",")
    args.stat = args.stat or ("median" if cuda else "min")
    args.rounds = args.rounds or 1
    args.steps = args.steps or (3 if args.small else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 10)
    return args


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measure(phase, model, runner, batch, args, device, peak_flops, key):
    """One phase ('infer' or 'train') of one case: throughput, FLOPs, MFU and peak memory."""
    g = torch.Generator(device=device).manual_seed(0)
    # three different batches to rotate through; random, never zeros
    xs = [torch.randn(batch, 3, args.image_size, args.image_size, device=device, generator=g) for _ in range(3)]
    ys = [torch.randint(0, 1000, (batch,), device=device, generator=g) for _ in range(3)]
    train = phase == "train"
    model.train(train)
    if (*key, phase, batch) not in FLOPS:  # once per model and batch, on the eager model
        FLOPS[(*key, phase, batch)] = count_flops(model, xs[0], ys[0], device, train)
    flops = FLOPS[(*key, phase, batch)]
    free_memory(device)
    if train:
        opt = make_optimizer(model, device)
        loss = train_step(runner, opt, xs[0], ys[0], device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"training loss is {loss.item()}")

        def fn(x, y):
            train_step(runner, opt, x, y, device)
    else:
        def fn(x, y):
            with torch.inference_mode(), autocast(device):
                runner(x)

    t = time_calls(fn, list(zip(xs, ys)), args.warmup, args.steps, device)
    step_s = t[f"{args.stat}_s"]
    result = {
        "batch": batch, "img_s": batch / step_s, "step_ms": 1e3 * step_s, "step_ms_median": 1e3 * t["median_s"],
        "step_ms_min": 1e3 * t["min_s"], "step_ms_max": 1e3 * t["max_s"], "steps": t["n"],
        "gflop_per_img": flops / batch / 1e9, "mfu": flops / step_s / peak_flops,
        "peak_mem_gib": peak_gib(device),
    }
    if train:
        del opt
    model.zero_grad(set_to_none=True)
    return result


def run_case(preset, impl, mode, args, device, peak_flops):
    """Both phases of one (size, implementation, mode); a failing phase is recorded, not raised."""
    case = {"model": preset, "impl": impl, "mode": mode}
    b_infer, b_train = GPU_BATCHES[preset] if device.type == "cuda" else (SMALL_BATCH, SMALL_BATCH)
    batches = {"infer": args.batch_infer or b_infer, "train": args.batch_train or b_train}
    model = runner = None
    try:
        torch.manual_seed(0)
        model = build_model(impl, preset, args.image_size).to(device)
        runner = model if mode == "eager" else torch.compile(model, mode=None if args.compile_mode == "default" else args.compile_mode)
        for phase in ("infer", "train"):
            free_memory(device)
            try:
                case[phase] = measure(phase, model, runner, batches[phase], args, device, peak_flops, (preset, impl))
            except Exception as e:  # OOM, compile errors: record and go on with the next case
                traceback.print_exc()
                case[phase] = {"batch": batches[phase], "error": f"{type(e).__name__}: {str(e)[:500]}"}
    except Exception as e:  # the model itself failed to build or compile
        traceback.print_exc()
        case["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    del model, runner
    torch._dynamo.reset()  # drop compiled graphs, so the next case starts clean and memory is freed
    free_memory(device)
    return case


def fmt(v, spec):
    return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))


def print_table(results):
    """One row per case; the ratio is against timm compiled in the same run (timm eager if not compiled)."""
    print()
    header = (f"{'model':6} {'impl':5} {'mode':8} | {'infer img/s':>11} {'MFU':>5} {'GiB':>6} {'x timm':>6} | "
              f"{'train img/s':>11} {'MFU':>5} {'GiB':>6} {'x timm':>6} | note")
    print(header)
    print("-" * len(header))
    for r in results:
        refs = {m: next((c for c in results if c["model"] == r["model"] and c["impl"] == "timm" and c["mode"] == m), None)
                for m in ("compile", "eager")}
        cells, notes = [], []
        for phase in ("infer", "train"):
            p = r.get(phase, {})
            ref = next((c[phase] for c in refs.values() if c and "img_s" in c.get(phase, {})), None)
            ratio = p["img_s"] / ref["img_s"] if ref and "img_s" in p else None
            cells.append(f"{fmt(p.get('img_s'), '11.1f')} {fmt(p.get('mfu'), '5.2f')} {fmt(p.get('peak_mem_gib'), '6.1f')} {fmt(ratio, '6.2f')}")
            if p.get("spread", 0) > 0.1:
                notes.append(f"{phase} rounds spread {100 * p['spread']:.0f}%")
            if "error" in p:
                notes.append(f"{phase} failed: {p['error'][:60]}")
        if "error" in r:
            notes.append(f"failed: {r['error'][:60]}")
        print(f"{r['model']:6} {r['impl']:5} {r['mode']:8} | {cells[0]} | {cells[1]} | {'; '.join(notes)}")
    print("x timm: ratio against timm compiled of the same size (timm eager where timm was not compiled)")


def merge_rounds(cases):
    """One case from its rounds: median img/s over the rounds that worked, and their spread."""
    merged = {k: cases[0][k] for k in ("model", "impl", "mode")}
    for phase in ("infer", "train"):
        ok = [c[phase] for c in cases if "img_s" in c.get(phase, {})]
        if not ok:
            merged[phase] = next((c[phase] for c in cases if phase in c), {"error": cases[0].get("error", "failed")})
            continue
        rates = sorted(p["img_s"] for p in ok)
        mid = ok[[p["img_s"] for p in ok].index(rates[len(rates) // 2])]  # the median round (upper, for even counts)
        merged[phase] = dict(mid, img_s=statistics.median(rates), rounds_img_s=rates,
                             spread=(rates[-1] - rates[0]) / statistics.median(rates))
        merged[phase]["mfu"] = mid["mfu"] * merged[phase]["img_s"] / mid["img_s"]
    return merged


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast, same for all three
        torch.backends.cudnn.allow_tf32 = True
    cpu_threads(device, args.threads)
    peak = matmul_peak(device)
    report = {"env": environment(device), "args": vars(args), "matmul_peak_tflops": peak / 1e12, "results": [], "rounds": []}
    print(f"{report['env'].get('gpu', 'cpu')}: matmul peak {peak / 1e12:.3f} TFLOP/s "
          f"({'bf16' if device.type == 'cuda' else 'fp32'}), used for MFU", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    sdpa = torch.nn.attention.SDPBackend
    backends = {"flash": sdpa.FLASH_ATTENTION, "cudnn": sdpa.CUDNN_ATTENTION,
                "efficient": sdpa.EFFICIENT_ATTENTION, "math": sdpa.MATH}
    keys = [(preset, impl, mode) for preset in args.models for impl in args.impls for mode in args.modes]
    for rnd in range(args.rounds):
        # rotate the order each round, so no implementation always runs first on a cold machine
        shift = rnd * len(args.modes) % len(keys)
        for preset, impl, mode in keys[shift:] + keys[:shift]:
            with torch.nn.attention.sdpa_kernel(backends[args.sdpa]) if args.sdpa else contextlib.nullcontext():
                case = run_case(preset, impl, mode, args, device, peak)
            report["rounds"].append(dict(case, round=rnd))
            summary = " ".join(f"{ph} {case[ph]['img_s']:.1f} img/s" if "img_s" in case.get(ph, {}) else f"{ph} failed"
                               for ph in ("infer", "train"))
            print(f"round {rnd}: {preset} {impl} {mode}: {summary}", flush=True)
            done = [[c for c in report["rounds"] if (c["model"], c["impl"], c["mode"]) == k] for k in keys]
            report["results"] = [merge_rounds(cs) for cs in done if cs]
            with open(args.out, "w") as f:  # rewritten each case: a timeout still leaves the finished ones
                json.dump(report, f, indent=2)
    print_table(report["results"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
