"""Which precision a run trains in, and the autocast context for it.

`train.precision` is "auto", "bf16", "fp16" or "fp32", on the GPU and on the CPU alike:
- CUDA: auto is bf16 where the GPU has it, else fp16 (with a gradient scaler).
- MPS (Apple GPUs): auto is bf16 where torch runs it there (macOS 14 or newer), else fp32; fp16 is
  refused, as its gradient scaler runs on CUDA only here. Unmeasured: no Mac has run this project yet.
- CPU: bf16 autocast pays off only on CPUs with native bf16 matmuls (AVX512-BF16, AMX), and by how
  much depends on the shapes (a training step on a 2-core AVX512-BF16 EPYC: 1.9x for the default
  width-96 model, 2.7x for width 192; the model's attention avoids SDPA's slow bf16 CPU kernel). Where
  the flags cannot tell, or a CPU's bf16 is slow, only timing can, so auto times a few training steps of
  the actual model in both precisions and takes bf16 only when it is clearly faster. fp16 has no fast
  CPU kernels and is refused there.
The choice is saved in the checkpoint and reused on resume, so a resumed run stays bit-exact, unless
the resumed run's device cannot run it (fp16 saved on CUDA, resumed on the CPU): then it is chosen again.
"""

import copy
import os
import statistics
import time
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

from vit.errors import UserError

BF16_GAIN = 1.15  # auto takes CPU bf16 only when a step is at least this much faster than fp32
PROBE_BATCH = 128  # images per timed step at most: the run's batch, or fewer when a step takes over
PROBE_STEP_S = 0.5  # ... this long (a B/16 at 224 probes with a few images, not a whole batch)
PROBE_SECONDS = 8.0  # time budget of the probe, after its warm-up steps


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on the run's device; fp32 is a no-op context."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cpu_has_native_bf16() -> Optional[bool]:
    """True/False from the CPU flags on Linux; None where the flags cannot be read (then auto measures)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16")) if flags else None


def resolve(requested: str, device: torch.device, model: torch.nn.Module, sample_shape: tuple,
            saved: Optional[str] = None) -> tuple[str, str]:
    """(precision, reason) for this run: `requested` from params, `saved` from the checkpoint resumed."""
    if requested == "auto" and saved is not None:
        if runs_on(saved, device):
            return saved, "auto, as chosen when this run started (kept so the resumed run stays exact)"
        precision, why = resolve(requested, device, model, sample_shape)
        return precision, f"{why}; the run started in {saved}, which {device.type} does not run"
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16", "auto: this GPU has bf16") if bf16 else ("fp16", "auto: this GPU has no bf16")
        if requested == "bf16" and not bf16:
            raise UserError("train.precision is bf16 but this GPU has no bf16; set train.precision to fp16 or auto.")
        return requested, "train.precision"
    if device.type == "mps":
        return _resolve_mps(requested)
    if requested == "fp16":
        raise UserError("train.precision fp16 needs a CUDA GPU (the CPU has no fast fp16 kernels); "
                        "set train.precision to auto, bf16 or fp32.")
    if requested != "auto":
        return requested, "train.precision"
    if cpu_has_native_bf16() is False:
        return "fp32", "auto: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would be emulated"
    fp32_s, bf16_s, batch = time_steps(model, sample_shape, device)
    gain = fp32_s / bf16_s
    choice = "bf16" if gain >= BF16_GAIN else "fp32"
    return choice, (f"auto: a training step of this model took {1e3 * bf16_s:.0f} ms in bf16 and "
                    f"{1e3 * fp32_s:.0f} ms in fp32 at batch {batch} ({gain:.2f}x; bf16 needs {BF16_GAIN}x)")


def _resolve_mps(requested: str) -> tuple[str, str]:
    """An Apple GPU: bf16 autocast where torch runs it (macOS 14 or newer), else fp32; no fp16 (its gradient
    scaler is CUDA-only here) and no timing (the CPU's probe would measure the wrong device)."""
    bf16 = torch.backends.mps.is_macos_or_newer(14, 0)
    if requested == "fp16":
        raise UserError("train.precision fp16 needs a gradient scaler, which this project runs on CUDA only; "
                        "set train.precision to auto, bf16 or fp32 on mps.")
    if requested == "bf16" and not bf16:
        raise UserError("train.precision is bf16 but torch runs bf16 on MPS only from macOS 14; set train.precision to auto or fp32.")
    if requested != "auto":
        return requested, "train.precision"
    return ("bf16", "auto: torch runs bf16 autocast on this Apple GPU") if bf16 else ("fp32", "auto: bf16 on MPS needs macOS 14")


def runs_on(precision: str, device: torch.device) -> bool:
    """Whether `device` runs `precision` (a resumed run's saved choice may come from another device)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return precision == "bf16" and torch.backends.mps.is_macos_or_newer(14, 0)
    return precision == "bf16"


def time_steps(model: torch.nn.Module, sample_shape: tuple, device: torch.device) -> tuple[float, float, int]:
    """(fp32 s, bf16 s, batch): median seconds of one forward+backward in fp32 and in bf16 autocast."""
    times, batch = interleaved_steps(model, sample_shape, device, {"fp32": ("fp32", None), "bf16": ("bf16", None)})
    return times["fp32"], times["bf16"], batch


def interleaved_steps(model: torch.nn.Module, sample_shape: tuple, device: torch.device,
                      variants: dict) -> tuple[dict, int]:
    """({name: median seconds of one forward+backward}, batch) for each of `variants`, {name: (precision,
    prepare)}, where prepare(copy) sets the model's copy up for that variant (or is None). The variants'
    steps take turns, so that load from other processes hits them alike. Runs on a copy under a forked
    RNG: the run itself is untouched."""
    probe = copy.deepcopy(model).train()
    batch = min(sample_shape[0], PROBE_BATCH)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)

        def step(name):
            precision, prepare = variants[name]
            if prepare is not None:
                prepare(probe)
            x = torch.randn((batch, *sample_shape[1:]), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, precision):
                logits = probe(x).logits
            F.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long, device=device)).backward()
            probe.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        # warm-up: the first calls pick kernels and allocate; a slow model probes with fewer images
        names = list(variants)
        while step(names[0]) > PROBE_STEP_S and batch > 1:
            batch = max(1, batch // 4)
        for name in names[1:]:
            step(name)
        times = {name: [] for name in names}
        deadline = time.perf_counter() + PROBE_SECONDS
        while len(times[names[-1]]) < 3 or (len(times[names[-1]]) < 7 and time.perf_counter() < deadline):
            for name in names:
                times[name].append(step(name))
    return {name: statistics.median(t) for name, t in times.items()}, batch


def thread_note() -> str:
    """One phrase on the CPU threads and how they wait, for the start-up line."""
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    waits = ("threads wait passively, so other processes on these cores slow it down instead of stalling it"
             if policy.upper() == "PASSIVE" else
             f"OMP_WAIT_POLICY={policy or 'unset'}: if other processes share these cores, OMP_WAIT_POLICY=PASSIVE keeps it from stalling")
    return f"{torch.get_num_threads()} thread(s); {waits}"
