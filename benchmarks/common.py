"""What both benchmark scripts share: the three implementations, a timer, FLOP counting, the matmul peak.

Timing: warm up first, time every step with CUDA events (or a host clock on the CPU, where calls are
synchronous), take the median, rotate the inputs (benchmarks/NOTES.md gives the protocol).
"""

import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# the scripts run as `python benchmarks/x.py` from the repository root: make `vit` and `data` importable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from vit import PRESETS, ViTConfig, ViTForImageClassification  # noqa: E402

IMPLS = ("ours", "timm", "hf")


class Logits(nn.Module):
    """Wraps a model whose forward returns an output object, so every implementation returns logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def sizes_of(preset):
    """'B/16' -> the (width, depth, heads, mlp, patch) that build_model also takes directly."""
    size, patch = preset.split("/")
    return (*PRESETS[size], int(patch))


def build_model(impl, preset, image_size=224, num_labels=1000, num_channels=3):
    """One of the three implementations, randomly initialised (no hub, ever): at a paper size ('B/16')
    or at explicit (width, depth, heads, mlp, patch), e.g. a params.json model."""
    width, depth, heads, mlp, patch = sizes_of(preset) if isinstance(preset, str) else preset
    if impl == "ours":
        config = ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
                           patch_size=patch, layer_norm_eps=1e-6, image_size=image_size, num_labels=num_labels,
                           num_channels=num_channels)
        return Logits(ViTForImageClassification(config))
    if impl == "timm":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=image_size, patch_size=patch, in_chans=num_channels, num_classes=num_labels,
                                 embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp / width)
    if impl == "hf":
        import transformers

        config = transformers.ViTConfig(
            hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=mlp,
            image_size=image_size, patch_size=int(patch), num_channels=num_channels, num_labels=num_labels,
            layer_norm_eps=1e-6, qkv_bias=True, attn_implementation="sdpa",
        )
        return Logits(transformers.ViTForImageClassification(config))
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def autocast(device, precision=None):
    """bf16 autocast on CUDA; on the CPU plain fp32 unless precision="bf16" asks for it there too."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or precision == "bf16")


def make_optimizer(model, device):
    """AdamW, fused into one kernel per step on CUDA; the default (foreach) one on the CPU."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")


def train_step(model, opt, x, y, device, precision=None):
    """Forward, loss, backward and optimizer step: what one training iteration costs."""
    with autocast(device, precision):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, args_list, warmup, steps, device):
    """Seconds per call of fn(*args): median, min and max over `steps` calls after `warmup` untimed ones.

    The calls rotate through args_list, so repeated calls don't just measure the cache.
    """
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    sync(device)
    times = []
    if device.type == "cuda":
        events = []
        for i in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args_list[i % len(args_list)])
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for i in range(steps):
            t0 = time.perf_counter()
            fn(*args_list[i % len(args_list)])
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def count_flops(model, x, y, device, train):
    """FLOPs of one forward (train=False) or forward+backward (train=True) at this batch, counted by torch."""
    counter = FlopCounterMode(display=False)
    if train:
        with counter:
            with autocast(device):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with counter, torch.no_grad(), autocast(device):
            model(x)
    return counter.get_total_flops()


def matmul_peak(device, n=None, repeats=30):
    """The dense matmul rate this device reaches right now, in FLOP/s: bf16 on CUDA, fp32 on the CPU.

    This is the ceiling MFU is measured against (a datasheet number is only a lead).
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    # random operands (never zeros), three pairs to rotate through
    pairs = [(torch.randn(n, n, device=device, dtype=dtype, generator=g),
              torch.randn(n, n, device=device, dtype=dtype, generator=g)) for _ in range(3)]
    # a longer warm-up on CUDA: the clocks ramp up during the first few hundred milliseconds
    t = time_calls(torch.mm, pairs, warmup=50 if device.type == "cuda" else 2, steps=repeats, device=device)
    return 2 * n**3 / t["median_s"]


def cpu_threads(device, threads=None):
    """Intra-op threads: as asked, else 1 on the CPU (on a shared machine a lone thread never waits
    at an OpenMP barrier for a core someone else took) and torch's default on CUDA."""
    if threads or device.type == "cpu":
        torch.set_num_threads(threads or 1)


def environment(device):
    """Versions and hardware, so a result file says what produced it."""
    import timm
    import transformers

    env = {
        "torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": str(device), "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), sm_count=props.multi_processor_count)
    return env
