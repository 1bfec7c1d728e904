"""What a training run tells: the lines it prints (data counts, the cost line, each epoch's line, the
summary at the end), the end-of-run report's files (per-class accuracy, confusion matrix,
misclassified images), and the sentence for a run's file that cannot be written.

These are the program's output, printed on rank 0; the library below logs instead (the `vit` logger).
"""

import json
import os
from typing import Optional

import torch

from vit import errors
from vit.evaluation import per_class_accuracy
from vit.files import atomic_write
from vit.run_folder import CONFUSION, FILES, LAST, MISCLASSIFIED, PER_CLASS
from vit.viz import plots
from vit.viz.text import count, duration, label


def writing(path: str, last_path: str):
    """Around a write of one of the run's files: a full disk or an unwritable folder stops the run with
    one sentence that says what is saved and how to go on (decided when the write fails)."""
    return errors.writing(path, lambda: (f"{last_path} is saved, so free space and resume with --resume"
                                         if os.path.isfile(last_path)
                                         else "no checkpoint was saved yet, so free space and start again"))


def data_counts(data_params: dict, loaders, batch: int) -> str:
    """`data: 72 train images, 8 val images (split off ...); drop_last leaves out 8 train images per epoch`."""
    r, train = loaders.report, loaders.train
    where = ""
    if data_params["dataset"] == "folder" and not data_params["val_dir"]:
        where = f" (val split off {data_params['train_dir']} by data.val_split {data_params['val_split']})"
    elif data_params["dataset"] == "fashion_mnist":
        where = " (val is the official test set)"
    line = f"data: {r['train_files']} train images, {r['val_files']} val images{where}"
    dropped = train.samples - len(train) * batch
    if dropped:  # the shuffled tail that does not fill a batch: other images each epoch
        line += f"; drop_last leaves out {dropped} train image(s) per epoch, a different {dropped} each epoch"
    return line


def epoch_line(record: dict) -> str:
    """`Epoch : 7 - loss : 0.2399 - acc: 0.9014 - val_loss : 0.9127 - val_acc: 0.6396 [- val_top5: ...] [- val_acc_ema: ...]`."""
    line = f"Epoch : {record['epoch']} - loss : {record['loss']:.4f} - acc: {record['acc']:.4f}"
    if "val_loss" in record:
        line += f" - val_loss : {record['val_loss']:.4f} - val_acc: {record['val_acc']:.4f}"
    if "val_top5" in record:
        line += f" - val_top5: {record['val_top5']:.4f}"
    if "val_acc_ema" in record:
        line += f" - val_acc_ema: {record['val_acc_ema']:.4f}"
    return line


def speed_phrase(rate: float, device: torch.device, precision: str) -> str:
    """`speed: 1,938 images/s on the CPU (2 threads, bf16)`."""
    threads = torch.get_num_threads()
    where = f"CPU ({count(threads, 'thread')}, {precision})" if device.type == "cpu" else f"{device} ({precision})"
    return f"speed: {rate:,.0f} images/s on the {where}"


def cost_line(rate: float, full_epoch_s: float, eval_s: float, eval_every: int, shares: list, epoch: int,
              device: torch.device, precision: str) -> str:
    """What the run will cost, from the measured training speed `rate`: an epoch on all patches trains
    in `full_epoch_s` and an evaluation takes `eval_s`; `shares` is each epoch's cost against such an
    epoch (below 1 where patch dropout is on), and the run stands at `epoch`."""
    costs = [full_epoch_s * share + eval_s / eval_every for share in shares]
    total, left = sum(costs), sum(costs[epoch:])
    each = f"≈ {duration(total / len(costs))}/epoch with evaluation" + (", fewer where patches drop" if min(shares) < 1 else "")
    return (f"{speed_phrase(rate, device, precision)}: {each}, ≈ {duration(total)} for {count(len(costs), 'epoch')}"
            + (f" ({duration(left)} left)" if epoch else ""))


def report(val: dict, classes: list, out: str, n_mistakes: int) -> None:
    """End of run, on rank 0: confusion matrix, per-class accuracy (json + printed), misclassified grid,
    from the last evaluation `val` (with its confusion and mistakes)."""
    matrix = val["confusion"]
    per_class = per_class_accuracy(matrix, classes)
    path, last_path = os.path.join(out, PER_CLASS), os.path.join(out, LAST)
    with writing(path, last_path):  # resuming a complete run writes the report again
        atomic_write(path, lambda f: json.dump(per_class, f, indent=2), mode="w")
    print("per-class accuracy: " + ", ".join(f"{label(c)} {a:.4f}" for c, a in per_class.items()))
    with writing(os.path.join(out, CONFUSION), last_path):
        plots.plot_confusion(matrix, classes, os.path.join(out, CONFUSION))
    wrong = val["mistakes"][:n_mistakes]
    with writing(os.path.join(out, MISCLASSIFIED), last_path):
        plots.plot_misclassified([img.numpy() for img, _, _ in wrong], [classes[t] for _, t, _ in wrong],
                                 [classes[p] for _, _, p in wrong], os.path.join(out, MISCLASSIFIED))


def summary_line(history: list, elapsed: float, out: str, metric: str = "val_acc", budget_s: Optional[float] = None) -> str:
    """The run's end: time (against the time budget `budget_s`, if any), the best `metric`
    (output.best_metric) and its epoch, and the files in the run folder."""
    present = [f for f in FILES if os.path.exists(os.path.join(out, f))]
    scored = [h for h in history if metric in h]
    best = max(scored, key=lambda h: h[metric], default=None)  # the first of equals, as best.pt keeps it
    result = f"best {metric} {best[metric]:.4f} at epoch {best['epoch']}" if best else "no validation data"
    took = duration(elapsed)
    if budget_s is not None:
        within = "within" if elapsed <= budget_s else f"{elapsed - budget_s:.0f} s past"
        took += f" ({within} the time budget of {budget_s / 60:g} min)"
    return f"done: {count(len(history), 'epoch')} in {took}, {result}; in {out}: {', '.join(present)}"
