"""`vit runs [DIR ...]`: the training runs in DIR (default runs/) as a table, one row per run folder.

Each row: the run's name, its epochs done out of those planned, its best val_acc (output.best_metric)
and that epoch, its wall time, whether it is complete, resumable or stopped, and its values of the params
that differ between the listed runs; under the table, each such key with its values in row order
(`train.lr 0.002 → 0.001`). `--csv FILE` writes the same rows with the numbers unrounded.

A run's files are read as a stranger's: each bounded in size, a FIFO, device or socket refused from
os.stat before anything opens it, JSON of any depth or garbage turned into a note, last.pt read with
weights_only and its tensors mapped, not read. A folder that is not a run, or a run whose files cannot be
read, gets a row that says so; nothing stops the table. Nothing here imports the training code.
"""

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from vit import params as P
from vit.errors import UserError, special_file_kind, writing
from vit import files
from vit.files import atomic_write
from vit.loading.core import read_file
from vit.run_folder import LAST, METRICS, PARAMS
from vit.viz.text import duration, label

MAX_PARAMS_BYTES = 1 << 20  # a resolved params.json is a few KB
MAX_METRICS_BYTES = 32 << 20  # a metrics.jsonl line is ~300 bytes: 100,000 epochs
MAX_RECORDS = 100_000  # epochs a run may have: more short lines would hold gigabytes as records
METRICS_OF = ("val_acc", "val_acc_ema")  # what output.best_metric may name
SAME_FOR_ALL = ("output.dir",)  # a run's folder: it differs between runs by definition
SHOWN = 40  # characters of a params value in the table
STATES = ("complete", "resumable", "stopped", "broken", "not a run")


class Unreadable(ValueError):
    """One of a run's files cannot be read as what it should be; the row's note says which and why."""


@dataclass
class Row:
    """What the table shows of one folder; None where its files do not say."""

    name: str
    path: str
    state: str = "not a run"  # one of STATES
    notes: list = field(default_factory=list)  # why broken, not a run or stopped
    done: Optional[int] = None  # epochs finished
    planned: Optional[int] = None
    metric: str = "val_acc"  # the run's output.best_metric
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    elapsed_s: Optional[float] = None
    params: Optional[dict] = None  # "section.key" -> value, the schema's defaults for keys the run predates


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -----------------------------------------------------------------------------
# reading one folder


def present(path: str) -> bool:
    """Whether a run's file is there (a dangling link counts: it cannot be read); Unreadable when it is a
    FIFO, device or socket, told from os.stat before anything opens it."""
    kind = special_file_kind(path)
    if kind is not None:
        raise Unreadable(f"{os.path.basename(path)} is {kind}")
    return os.path.lexists(path)


def read_text(path: str, limit: int) -> Optional[str]:
    """A run's text file, None when absent; Unreadable when it is not a regular file, larger than
    `limit` bytes, unreadable or not UTF-8."""
    name = os.path.basename(path)
    if not present(path):
        return None
    if not os.path.isfile(path):
        raise Unreadable(f"{name} is not a file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise Unreadable(f"{name} cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise Unreadable(f"{name} is larger than {limit >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Unreadable(f"{name} is not UTF-8 text") from None


def parse_json(text: str, what: str):
    try:
        return files.parse_json(text, what)  # its nesting bounded before the parser recurses
    except UserError:  # syntax, nesting, an integer past Python's digit limit
        raise Unreadable(f"{what} is not valid JSON") from None


def read_params(folder: str) -> Optional[dict]:
    """params.json as {"section.key": value}, `_doc` notes left out; None when absent."""
    text = read_text(os.path.join(folder, PARAMS), MAX_PARAMS_BYTES)
    if text is None:
        return None
    params = parse_json(text, PARAMS)
    if not isinstance(params, dict) or not all(isinstance(v, dict) for k, v in params.items() if k != P.DOC_KEY):
        raise Unreadable(f"{PARAMS} is not sections of keys")
    flat = {f"{s}.{k}": v for s, keys in params.items() if s != P.DOC_KEY for k, v in keys.items() if k != P.DOC_KEY}
    for key, v in flat.items():  # a value is a number, a string or a flat list: deeper JSON is not a run's
        if isinstance(v, (list, dict)) and any(isinstance(x, (list, dict)) for x in (v.values() if isinstance(v, dict) else v)):
            raise Unreadable(f"{PARAMS} holds {key} nested in lists or objects")
    return flat


def read_history(folder: str) -> Optional[list]:
    """metrics.jsonl's records, one per finished epoch; None when absent."""
    text = read_text(os.path.join(folder, METRICS), MAX_METRICS_BYTES)
    if text is None:
        return None
    history = []
    for n, line in enumerate(text.splitlines(), 1):
        if len(history) == MAX_RECORDS:
            raise Unreadable(f"{METRICS} holds more than {MAX_RECORDS:,} records")
        if line.strip():
            record = parse_json(line, f"{METRICS} line {n}")
            if not isinstance(record, dict) or not _count(record.get("epoch")):
                raise Unreadable(f"{METRICS} line {n} is not an epoch's record")
            history.append(record)
    return history


def read_checkpoint(folder: str) -> Optional[dict]:
    """What last.pt says beside its weights (its tensors mapped, never read); None when absent."""
    path = os.path.join(folder, LAST)
    if not present(path):
        return None
    try:
        ckpt = read_file(path, mmap=True)
    except UserError:
        raise Unreadable(f"{LAST} cannot be read as a checkpoint") from None
    if not isinstance(ckpt, dict) or not _count(ckpt.get("epoch")):
        raise Unreadable(f"{LAST} is not a training checkpoint of this project")
    return {k: ckpt.get(k) for k in ("epoch", "elapsed_s", "plan")}


def planned_epochs(checkpoint: Optional[dict], params: Optional[dict]) -> Optional[int]:
    """How many epochs a run means to train: the plan its last.pt keeps (vit/train/budget.py's, which a
    time budget decides), else params.json's train.epochs; None when neither says. The one place this is read."""
    plan = (checkpoint or {}).get("plan")
    if isinstance(plan, dict) and _count(plan.get("epochs")):
        return plan["epochs"]
    epochs = (params or {}).get("train.epochs")
    return epochs if _count(epochs) else None


def read_run(folder: str) -> Row:
    """One folder's row: what each of its files says, each read on its own, so one broken file leaves the rest."""
    row = Row(label(os.path.basename(os.path.normpath(folder))), folder)
    if not os.path.isdir(folder):
        row.notes.append("no such folder" if not os.path.lexists(folder) else "not a folder")
        return row
    found = {}
    for name, read in ((PARAMS, read_params), (METRICS, read_history), (LAST, read_checkpoint)):
        try:
            found[name] = read(folder)
        except Unreadable as e:
            row.notes.append(str(e))
            found[name] = None
    params, history, ckpt = found[PARAMS], found[METRICS], found[LAST]
    if not row.notes and params is None and history is None and ckpt is None:
        row.notes.append(f"no {PARAMS}, {METRICS} or {LAST}")
        return row
    if params is not None:
        row.params = {f"{s}.{k}": v for s, keys in P.defaults().items() for k, v in keys.items()} | params
        if params.get("output.best_metric") in METRICS_OF:
            row.metric = params["output.best_metric"]
    row.planned = planned_epochs(ckpt, params)
    history = history or []
    scored = [h for h in history if _number(h.get(row.metric))]
    if scored:
        best = max(scored, key=lambda h: h[row.metric])  # the first of equals, as best.pt keeps it
        row.best, row.best_epoch = best[row.metric], best["epoch"]
    row.done = ckpt["epoch"] if ckpt else max((h["epoch"] for h in history), default=None)
    elapsed = [e for e in ((ckpt or {}).get("elapsed_s"), history[-1].get("elapsed_s") if history else None) if _number(e)]
    row.elapsed_s = elapsed[0] if elapsed else None
    if row.notes:
        row.state = "broken"
    elif ckpt is None:
        row.state = "stopped"
        row.notes.append(f"no {LAST}: stopped before its first checkpoint (or still in it), so it cannot resume")
    else:
        row.state = "complete" if row.planned is not None and ckpt["epoch"] >= row.planned else "resumable"
    return row


# -----------------------------------------------------------------------------
# the folders, the table, the csv


def run_folders(dirs: Sequence[str]) -> list[str]:
    """Each DIR that is a run folder itself, else the folders inside it, sorted; a DIR that is neither
    stays in the list (its row says so)."""
    folders = []
    for d in dirs:
        if any(os.path.lexists(os.path.join(d, name)) for name in (PARAMS, METRICS, LAST)) or not os.path.isdir(d):
            folders.append(d)
            continue
        try:
            names = sorted(os.listdir(d))
        except OSError:
            folders.append(d)  # its row: not a run, and read_run cannot list it either
            continue
        folders += [os.path.join(d, n) for n in names if os.path.isdir(os.path.join(d, n))]
    return folders


def shown(value, width: Optional[int] = SHOWN) -> str:
    """A params value as the table shows it: strings bare, the rest as JSON, at most `width` characters
    (None: all); "-" where a run has no such key."""
    if value is _ABSENT:
        return "-"
    text = label(value) if isinstance(value, str) else json.dumps(value)
    return text if width is None or len(text) <= width else text[:width - 1] + "…"


_ABSENT = object()


def differing(rows: Sequence[Row]) -> list[str]:
    """The params keys whose values are not the same in every listed run that has params."""
    with_params = [r.params for r in rows if r.params is not None]
    keys = list(dict.fromkeys(k for p in with_params for k in p))
    return [k for k in keys if k not in SAME_FOR_ALL
            and len({json.dumps(p[k], sort_keys=True) if k in p else "-" for p in with_params}) > 1]


def cells(row: Row, keys: Sequence[str]) -> list[str]:
    """One row of the table: run, epochs, best, its epoch, elapsed, state, and the differing params or the notes."""
    epochs = f"{'?' if row.done is None else row.done}/{'?' if row.planned is None else row.planned}"
    best = "-" if row.best is None else f"{row.best:.4f}" + (" (ema)" if row.metric == "val_acc_ema" else "")
    values = ", ".join(f"{k} {shown(row.params.get(k, _ABSENT))}" for k in keys) if row.params else ""
    if row.state == "not a run":
        epochs = best = ""
    return [row.name, epochs, best, "" if row.best_epoch is None else str(row.best_epoch),
            "" if row.elapsed_s is None else duration(row.elapsed_s), row.state, "; ".join(filter(None, [values, *row.notes]))]


HEADER = ["run", "epochs", "best val_acc", "epoch", "elapsed", "state", "params that differ / notes"]


def table(rows: Sequence[Row]) -> str:
    """The rows as aligned text, then each differing key with its values in row order."""
    keys = differing(rows)
    lines = [HEADER] + [cells(r, keys) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]
    text = ["  ".join([*(c.ljust(w) for c, w in zip(line, widths)), line[-1]]).rstrip() for line in lines]
    for k in keys:
        text.append(f"{k} " + " → ".join(shown(r.params.get(k, _ABSENT)) for r in rows if r.params is not None))
    return "\n".join(text)


def write_csv(rows: Sequence[Row], path: str) -> None:
    """The rows with unrounded numbers, one column per differing params key (values as JSON)."""
    keys = differing(rows)
    columns = ["run", "path", "state", "epochs_done", "epochs_planned", "best_metric", "best", "best_epoch",
               "elapsed_s", "notes", *keys]

    def write(f):
        out = csv.writer(f)
        out.writerow(columns)
        for r in rows:
            out.writerow([r.name, r.path, r.state, r.done, r.planned, r.metric, r.best, r.best_epoch, r.elapsed_s,
                          "; ".join(r.notes), *(shown(r.params.get(k, _ABSENT), None) if r.params else "" for k in keys)])

    with writing(path, "choose another --csv or free space there"):
        atomic_write(path, write, mode="w")


def runs(dirs: Sequence[str] = ("runs",), csv_path: Optional[str] = None) -> int:
    """Print the table of the runs in `dirs` (and write it to `csv_path`); returns the exit code."""
    rows = [read_run(f) for f in run_folders(dirs)]
    if not rows:
        print(f"no run folders in {', '.join(dirs)}")
        return 0
    print(table(rows))
    if csv_path is not None:
        write_csv(rows, csv_path)
        print(f"wrote {csv_path}")
    return 0
