"""Per-rank memory of parameters, gradients and AdamW state: DDP against FSDP2 (train.strategy "fsdp"),
2 ranks with gloo on the CPU, for ViT-B/16 and ViT-L/16 (1000 classes, fp32).

Each rank builds the model as the training run does (vit.train.optim's AdamW groups; for FSDP,
vit.train.fsdp.shard: fully_shard on each ViTLayer, then the root), takes one real training step
(batch 1 at 224, so AdamW's moments exist and DDP's gradient buckets are filled), and then counts the
bytes of the tensors it holds itself (a DTensor's local shard) and reads its resident memory (VmRSS,
which also holds torch's libraries, ~0.4 GB, and the allocator's leftovers). Each case runs in fresh
processes, one after the other.

With --meta the model lives on torch's meta device: no memory is allocated, no step is taken (the
gradients are set to zeros and AdamW steps once, so its state exists), and the same tensors are
counted: what a rank would hold, for a machine that cannot hold it (no resident memory then).

    python benchmarks/fsdp_memory.py                      # B/16 and L/16, DDP and FSDP, 2 ranks
    python benchmarks/fsdp_memory.py --presets B/16       # a smaller machine
    python benchmarks/fsdp_memory.py --presets L/16 --meta
"""

import argparse
import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit import ViTConfig, ViTForImageClassification, distributed  # noqa: E402
from vit.train import fsdp, optim  # noqa: E402

TRAIN = {"weight_decay": 0.05, "layer_decay": None, "lr": 1e-3}
GB = 1e9


def local_bytes(tensors):
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def rank_main(rank, world_size, port, preset, strategy, out, meta):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    d = distributed.init(timeout_s=600)
    torch.manual_seed(0)
    config = ViTConfig.from_preset(preset, image_size=224, num_labels=1000)
    with torch.device("meta" if meta else "cpu"):
        model = ViTForImageClassification(config)
    optimizer = optim.build_optimizer(model, TRAIN, d.device)
    if strategy == "fsdp":
        optimizer = fsdp.shard(model, optimizer, TRAIN, "fp32", d)
    if meta:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    else:
        runner = distributed.wrap(model, d, strategy)
        x, y = torch.randn(1, 3, 224, 224), torch.tensor([rank])
        torch.nn.functional.cross_entropy(runner(x).logits, y).backward()
    optimizer.step()  # AdamW's exp_avg and exp_avg_sq now exist; the gradients are kept, as between steps with set_to_none=False
    params = list(model.parameters())
    row = {"preset": preset, "strategy": strategy, "rank": rank, "parameters": sum(p.numel() for p in params),
           "params_gb": local_bytes(params) / GB,
           "grads_gb": local_bytes(p.grad for p in params if p.grad is not None) / GB,
           "adam_gb": local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()) / GB,
           "rss_gb": float("nan") if meta else rss_bytes() / GB}
    row["total_gb"] = row["params_gb"] + row["grads_gb"] + row["adam_gb"]
    rows = distributed.gather(row, d)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    distributed.cleanup(d)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="B/16,L/16")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--meta", action="store_true", help="count on the meta device: nothing allocated, no step")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "fsdp_memory.json"))
    args = p.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    results = []
    for preset in args.presets.split(","):
        for strategy in ("ddp", "fsdp"):
            part = args.out + ".part"
            mp.spawn(rank_main, args=(args.ranks, free_port(), preset, strategy, part, args.meta), nprocs=args.ranks)
            with open(part) as f:
                rows = json.load(f)
            os.remove(part)
            results += rows
            print(json.dumps(rows[0]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    how = "counted on the meta device" if args.meta else "after one AdamW step"
    print(f"\nper rank, {args.ranks} ranks, fp32, {how} (rank 0; the largest rank in brackets when they differ)")
    print("| model | strategy | parameters | params GB | grads GB | AdamW state GB | sum GB | resident GB |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        for strategy in ("ddp", "fsdp"):
            rows = [r for r in results if r["preset"] == preset and r["strategy"] == strategy]

            def cell(key):
                first, most = rows[0][key], max(r[key] for r in rows)
                return f"{first:.2f}" + (f" ({most:.2f})" if most - first > 0.005 else "")
            print(f"| ViT-{preset} | {strategy.upper()} | {rows[0]['parameters']:,} | {cell('params_gb')} | "
                  f"{cell('grads_gb')} | {cell('adam_gb')} | {cell('total_gb')} | {cell('rss_gb')} |")


if __name__ == "__main__":
    main()
