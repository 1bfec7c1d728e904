"""Every matplotlib figure of the project: training curves, confusion matrix, misclassified
images, attention maps and the ViT paper's Figure 7 panels.

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, never through pyplot,
so no global figure state is created or leaked and nothing needs a display. Each function saves
a PNG of exactly figsize * DPI pixels (no tight bounding box) and returns that (width, height).
The numbers come from `vit/visualize.py`; this file only draws.
"""

import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100  # pixels per inch of every saved PNG


def _figure(width, height):
    """A figure on its own Agg canvas, with constrained layout so labels don't overlap."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    """Write the PNG (creating its folder) and return its size in pixels."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    w, h = fig.get_size_inches()
    return round(w * DPI), round(h * DPI)


def _show(ax, image, **kwargs):
    """imshow for HxWxC uint8 arrays with C=1 or 3 (grayscale gets a gray colour map)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        kwargs = {"cmap": "gray", "vmin": 0, "vmax": 255, **kwargs}
    ax.imshow(image, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n, max_cols):
    """(rows, cols) for n panels, at most max_cols wide."""
    cols = max(1, min(n, max_cols))
    return max(1, math.ceil(n / cols)), cols


# -----------------------------------------------------------------------------
# training report


def plot_curves(history, path):
    """Loss and accuracy against epoch, train and val, from metrics.jsonl-style dicts; 1000x400 px."""
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    panels = [
        (ax_loss, "loss", [("loss", "train"), ("val_loss", "val")]),
        (ax_acc, "accuracy", [("acc", "train"), ("val_acc", "val"), ("val_top5", "val top-5")]),
    ]
    for ax, name, series in panels:
        for key, label in series:
            # eval may run only every few epochs: plot the epochs that have the key
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    ax_acc.set_ylim(top=1.0)
    return _save(fig, path)


def plot_confusion(matrix, class_names, path):
    """Confusion matrix, rows = true class: colour is the row-normalised rate, text the count.

    The figure grows with the number of classes K (side 6 to 24 inches) and the fonts shrink with
    the cells, so ~100 classes stay readable; zero counts are left blank once K > 20.
    """
    matrix = np.asarray(matrix)
    K = matrix.shape[0]
    side = float(np.clip(0.22 * K + 3, 6, 24))
    cell_pt = (side - 2.5) / K * 72  # approximate cell size in points
    font = float(np.clip(cell_pt * 0.35, 3, 10))
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # (K, K), rows sum to 1

    fig = _figure(side, side)
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(K):
        for j in range(K):
            if matrix[i, j] or K <= 20:
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=font,
                        color="white" if rates[i, j] > 0.5 else "black", in_layout=False)
    ax.set_xticks(range(K), class_names, rotation=90, fontsize=max(font, 4))
    ax.set_yticks(range(K), class_names, fontsize=max(font, 4))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"confusion matrix (accuracy {acc:.4f})")
    fig.colorbar(im, ax=ax, shrink=0.6, label="fraction of true class")
    return _save(fig, path)


def plot_misclassified(images, true_names, pred_names, path):
    """Grid of images (HxWxC uint8, C=1 or 3) titled "true / pred", 8 per row, 1.6x1.8 in each
    (at least two columns wide, so an empty grid still has room for its note)."""
    rows, cols = _grid(len(images), 8)
    fig = _figure(max(cols, 2) * 1.6, rows * 1.8)
    axes = np.atleast_1d(fig.subplots(rows, max(cols, 2))).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, t, p in zip(axes, images, true_names, pred_names):
        _show(ax, image)
        ax.set_title(f"{t} / {p}", fontsize=7, color="tab:red")
    if not images:
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    return _save(fig, path)
