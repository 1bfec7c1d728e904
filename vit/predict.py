"""`vit predict`: the top-k classes of images, in batches, printed or written as CSV or JSON.

It follows timm's inference.py: images in batches (`--batch-size`), a progress bar, and with
`--out preds.csv` or `--out preds.json` a file with timm's columns: `filename` (the path as given or
found), then for the top-k classes `index` (class indices), `label` (class names) and `prob` (softmax
probabilities), or `logit` with `--output logits`. Two layouts, one per format:

- CSV: one column per rank, `index_0 ... index_{k-1}`, `label_0 ...`, `prob_0 ...` (timm's
  `--results-separate-col`), so every cell is one value and a CSV reader gets numbers back;
- JSON: a list of records, one per image, whose `index`, `label` and `prob` are lists (timm's
  `json-records` orientation, as one document): every row is kept even when two files share a name.

Both add `error`: empty for a predicted image, else why there is no prediction (an unreadable file; a
head of zeros). An unreadable image gets its row, is counted in the summary line, and makes the exit
code 1 (commands.unreadable_exit_code). The summary line ends with images/s: reading, preprocessing
and the model, over the readable images.

`--int8` runs the model through torch's dynamic int8 quantization on the CPU (vit/quantize.py), and
also runs the float32 model on each batch to count how often the two agree on the top-1 class; that
check is left out of images/s.
"""

import csv
import json
import sys
import time
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from vit import distributed
from vit.commands import OUT_ADVICE, unreadable_exit_code, warn_zero_head
from vit.errors import UserError, existing_parent, writing
from vit.factory import load_model
from vit.files import atomic_write
from vit.quantize import Agreement, dynamic_int8
from vit.viz.text import label

OUTPUTS = {"probs": "prob", "logits": "logit"}  # --output -> timm's column name
FORMATS = (".csv", ".json")
ZERO_HEAD_ROW = "no prediction (the head is all zeros)"


def predict(checkpoint: str, images: Sequence[str], topk: int = 5, ema: bool = False, batch_size: int = 32,
            out: Optional[str] = None, output: str = "probs", int8: bool = False, device: str = "auto") -> int:
    """Predict the top-k classes of `images` (files, and folders for the images under them): printed one
    line per image, or written to `out` (.csv or .json). Returns the exit code: 1 when an image could not
    be read (its row says why), else 0."""
    from vit.data.images import BadImage
    from vit.data.inputs import image_arguments, preprocess

    check_arguments(topk, batch_size, out, output, int8, device)
    files = image_arguments(images)
    device = distributed.init("cpu" if int8 else device, key="--device").device
    model, info = load_model(checkpoint, device, ema)
    classes = info["classes"] or [str(i) for i in range(model.config.num_labels)]
    k = min(topk, len(classes))
    zero_head = warn_zero_head(model, checkpoint)
    runner = dynamic_int8(model) if int8 else model
    agreement = Agreement("int8 (torch dynamic quantization of the Linear layers)") if int8 else None
    column = OUTPUTS[output]
    rows, checking = [], 0.0
    t0 = time.perf_counter()
    with tqdm(total=len(files), desc="predict", unit="img", leave=False, dynamic_ncols=True) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            batch = {}  # position in chunk -> (1, C, H, W)
            chunk_rows = [None] * len(chunk)
            for j, path in enumerate(chunk):
                try:
                    batch[j] = preprocess(path, info)
                except (BadImage, OSError) as e:
                    chunk_rows[j] = error_row(path, f"cannot read ({label(e)})")
            if zero_head:
                chunk_rows = [row or error_row(path, ZERO_HEAD_ROW) for path, row in zip(chunk, chunk_rows)]
            elif batch:
                checking += predict_batch(chunk, batch, chunk_rows, runner, model, classes, k, output, agreement, device)
            if out is None:  # without a file, each image's line is printed as it comes
                for row in chunk_rows:
                    tqdm.write(printed(row, column), file=sys.stderr if row["error"] not in (None, ZERO_HEAD_ROW) else sys.stdout)
            rows += chunk_rows
            bar.update(len(chunk))
    seconds = time.perf_counter() - t0 - checking
    unreadable = sum(row["error"] not in (None, ZERO_HEAD_ROW) for row in rows)
    if out is not None:
        write(out, rows, k, column)
    print(summary(len(files) - unreadable, unreadable, seconds, device, batch_size, out))
    if agreement is not None:
        print(agreement.line())
        if agreement.warning():
            print(agreement.warning(), file=sys.stderr)
    return unreadable_exit_code(unreadable)


def predict_batch(chunk, batch, rows, runner, model, classes, k, output, agreement, device) -> float:
    """Fill `rows` (one per path of `chunk`) at the positions of `batch` ({position: (1, C, H, W)}) with
    `runner`'s top-k; with `agreement`, also run the float32 `model` and count. Returns the seconds that
    float32 check took (left out of images/s)."""
    x = torch.cat(list(batch.values())).to(device)  # (b, C, H, W)
    checking = 0.0
    with torch.no_grad():
        logits = runner(x).logits.float()  # (b, K)
        if agreement is not None:
            t0 = time.perf_counter()
            agreement.add(model(x).logits.float(), logits)
            checking = time.perf_counter() - t0
    top = (logits.softmax(-1) if output == "probs" else logits).topk(k)
    for j, i, v in zip(batch, top.indices.tolist(), top.values.tolist()):
        rows[j] = {"filename": chunk[j], "index": i, "label": [classes[c] for c in i], OUTPUTS[output]: v, "error": None}
    return checking


def check_arguments(topk, batch_size, out, output, int8, device):
    """Refuse what cannot work before any model is loaded, one sentence each."""
    if topk < 1:
        raise UserError(f"--topk {topk} must be 1 or more.")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} must be 1 or more.")
    if output not in OUTPUTS:
        raise UserError(f"--output {output} is not one of {', '.join(OUTPUTS)}.")
    if int8 and device not in ("auto", "cpu"):
        raise UserError(f"--int8 runs torch's dynamic int8 quantization, which runs on the CPU only; leave out "
                        f"--device {device} or --int8.")
    if out is not None:
        if not out.lower().endswith(FORMATS):
            raise UserError(f"--out {out} must end in .csv or .json (the format); e.g. --out preds.csv.")
        existing_parent(out, "--out")  # the policy of every --out: a file in a folder that exists


def error_row(path: str, error: str) -> dict:
    return {"filename": path, "index": None, "label": None, "error": error}


def printed(row: dict, column: str) -> str:
    """`path: name 0.9000, name 0.0500` (or `path: no prediction ...`)."""
    if row["error"] is not None:
        return f"{label(row['filename'])}: {row['error']}"
    pairs = zip(row["label"], row[column])
    return f"{label(row['filename'])}: " + ", ".join(f"{label(name)} {v:.4f}" for name, v in pairs)


def write(out: str, rows: list, k: int, column: str) -> None:
    """The rows as CSV (a column per rank) or JSON (a list of records), atomically."""
    if out.lower().endswith(".json"):
        records = [{"filename": r["filename"], "index": r["index"], "label": r["label"], column: r.get(column),
                    "error": r["error"]} for r in rows]
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"  # one record a line
    else:
        header = ["filename", *(f"{name}_{i}" for name in ("index", "label", column) for i in range(k)), "error"]
        lines = [header]
        for r in rows:
            ranked = [*(r["index"] or [""] * k), *(r["label"] or [""] * k), *(r.get(column) or [""] * k)]
            lines.append([r["filename"], *ranked, r["error"] or ""])
        text = None
    with writing(out, OUT_ADVICE):
        if text is not None:
            atomic_write(out, lambda f: f.write(text), mode="w")
        else:
            atomic_write(out, lambda f: csv.writer(f, lineterminator="\n").writerows(lines), mode="w")


def summary(readable: int, unreadable: int, seconds: float, device: torch.device, batch_size: int,
            out: Optional[str]) -> str:
    """`predicted 998 images in 4.1 s (243 images/s on cpu, batch 32); 2 unreadable (their rows say why); wrote preds.csv`."""
    line = (f"predicted {readable:,} image(s) in {seconds:.2f} s ({readable / max(seconds, 1e-9):,.0f} images/s on "
            f"{device.type}, batch {batch_size})")
    if unreadable:
        line += f"; {unreadable:,} unreadable" + (" (their rows say why)" if out else " (see above)")
    return line + (f"; wrote {out}" if out else "")
