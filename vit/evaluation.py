"""One evaluation pass over a loader: loss, accuracy, top-5, and for the end-of-run report a confusion
matrix and misclassified images; on any device, in any precision, over any number of processes.
DeiT's engine.evaluate, below the training code: the training run evaluates with it after each epoch,
and `vit eval` without training.
"""

import time
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vit import distributed
from vit.errors import UserError
from vit.precision import autocast


@contextmanager
def oom_hint(advice: str):
    """Turn CUDA's out-of-memory error into one sentence ending with `advice`."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(f"CUDA ran out of memory; {advice}") from None


def per_class_accuracy(confusion, classes: list) -> dict:
    """{class name: its accuracy} from a (K, K) confusion matrix whose rows are the true classes."""
    return {c: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, c in enumerate(classes)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, *, num_classes: int, d: distributed.Dist, precision: str = "fp32",
             oom_advice: str = "use a smaller batch.", mistakes: int = 0, denormalize: Optional[Callable] = None,
             confusion: bool = False, lockstep: bool = False) -> dict:
    """Loss, accuracy, top-5 (when > 5 classes) and images/s over `loader` on d.device; plain CE, no smoothing.
    With `lockstep` (an FSDP model, whose every forward is a collective) a rank out of batches runs the
    model on a blank image until every rank is done; that forward counts in no metric.

    With confusion=True, also returns `confusion` (K, K) rows = true class; with mistakes > 0 that too,
    and up to `mistakes` misclassified images as (uint8 HxWxC, true, pred) built with `denormalize(x) -> (B,H,W,C)`.
    """
    model.eval()
    device = d.device
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, correct, top5, count
    counts = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)  # (true, pred) pairs
    wrong = []
    t0 = time.time()
    bar = tqdm(loader, desc="eval", disable=not d.is_main, leave=False, dynamic_ncols=True)
    with bar, oom_hint(oom_advice):
        for batch in distributed.lockstep(bar, d) if lockstep else bar:
            if batch is None:
                c = model.config
                with autocast(device, precision):
                    model(torch.zeros(1, c.num_channels, c.image_size, c.image_size, device=device))
                continue
            x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x).logits.float()  # (B, K)
            pred = logits.argmax(-1)
            stats[0] += F.cross_entropy(logits, y, reduction="sum")
            stats[1] += (pred == y).sum()
            if num_classes > 5:
                stats[2] += (logits.topk(5, dim=-1).indices == y[:, None]).any(-1).sum()
            stats[3] += len(y)
            counts += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2)
            if len(wrong) < mistakes:
                bad = (pred != y).nonzero().flatten()[: mistakes - len(wrong)]
                if len(bad):
                    images = denormalize(x[bad].cpu())
                    wrong += list(zip(list(images), y[bad].tolist(), pred[bad].tolist()))
    elapsed = max(time.time() - t0, 1e-9)
    stats = distributed.all_reduce_sum(stats, d).tolist()
    count = max(stats[3], 1)
    out = {"loss": stats[0] / count, "acc": stats[1] / count, "images_per_s": stats[3] / elapsed}
    if num_classes > 5:
        out["top5"] = stats[2] / count
    if confusion or mistakes:
        out["confusion"] = distributed.all_reduce_sum(counts, d).view(num_classes, num_classes).long().cpu().numpy()
    if mistakes:
        out["mistakes"] = wrong
    return out
