"""Every matplotlib figure of the project: training curves, confusion matrix, misclassified
images, attention maps and the ViT paper's Figure 7 panels.

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, never through pyplot,
so no global figure state is created or leaked and nothing needs a display. Each function saves
a PNG of exactly figsize * DPI pixels (no tight bounding box) and returns that (width, height).
The numbers come from the training run (curves and the end-of-run report) and from
vit/viz/analysis.py through vit/commands.py (attention maps, Figure 7); this file only draws.
"""

import math
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vit.viz.text import label

DPI = 100  # pixels per inch of every saved PNG
LEGEND_COLUMNS = 6  # heads per legend row in the attention-distance figure


def _figure(width, height):
    """A figure on its own Agg canvas, with constrained layout so labels don't overlap."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path):
    """Write the PNG (creating its folder) and return its size in pixels; on a full disk the
    half-written PNG is removed and the OSError raised (the callers say what it means for them)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=DPI)
    except OSError:
        if os.path.isfile(path):
            os.remove(path)
        raise
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
        for key, legend in series:
            # eval may run only every few epochs: plot the epochs that have the key
            points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
            if points:
                x, y = zip(*points)
                ax.plot(x, y, marker="o" if len(points) < 30 else None, markersize=3, label=legend)
        ax.set_xlabel("epoch")
        # epochs are whole; min_n_ticks=1: a 1-epoch run's axis spans a tenth of an epoch, with one whole tick in it
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    ax_acc.set_ylim(top=1.01)  # room for dots at 100%
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
    names = [label(c) for c in class_names]
    ax.set_xticks(range(K), names, rotation=90, fontsize=max(font, 4))
    ax.set_yticks(range(K), names, fontsize=max(font, 4))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"confusion matrix (accuracy {acc:.4f})")
    fig.colorbar(im, ax=ax, shrink=0.6, label="fraction of true class")
    return _save(fig, path)


def plot_misclassified(images, true_names, pred_names, path):
    """Grid of images (HxWxC uint8, C=1 or 3) titled "true: ..." over "predicted: ...", 8 per row,
    1.6x1.8 in each (at least two columns wide, so an empty grid still has room for its note)."""
    rows, cols = _grid(len(images), 8)
    fig = _figure(max(cols, 2) * 1.6, rows * 1.8)
    axes = np.atleast_1d(fig.subplots(rows, max(cols, 2))).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, t, p in zip(axes, images, true_names, pred_names):
        _show(ax, image)
        ax.set_title(f"true: {label(t)}\npredicted: {label(p)}", fontsize=7, color="tab:red")
    if not images:
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    return _save(fig, path)


# -----------------------------------------------------------------------------
# attention maps and the ViT paper's Figure 7


def _unit(a):
    """Scale an array to [0, 1] (a constant array becomes all zeros)."""
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def plot_attention(image, rollout_map, head_maps, path, title=None):
    """Image, rollout overlay and rollout map on the first row, then one CLS-attention map per head.

    image: (H, W, C) uint8 as the model saw it; rollout_map: (gh, gw); head_maps: (heads, gh, gw).
    Columns = max(3, min(heads, 6)), 2 inches each; rows = 1 + ceil(heads / columns), 2.2 inches each.
    """
    heads = len(head_maps)
    cols = max(3, min(heads, 6))
    rows = 1 + math.ceil(heads / cols)
    fig = _figure(cols * 2.0, rows * 2.2)
    axes = np.atleast_2d(fig.subplots(rows, cols))
    for ax in axes.ravel():
        ax.axis("off")
    h, w = np.asarray(image).shape[:2]
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # stretch the patch grid over the image's pixels

    _show(axes[0, 0], image)
    axes[0, 0].set_title("input", fontsize=9)
    _show(axes[0, 1], image)
    axes[0, 1].imshow(_unit(rollout_map), cmap="jet", alpha=0.5, extent=extent, interpolation="bilinear")
    axes[0, 1].set_title("attention rollout", fontsize=9)
    axes[0, 2].imshow(rollout_map, cmap="viridis")
    axes[0, 2].set_title("rollout (patch grid)", fontsize=9)
    for i, m in enumerate(head_maps):
        ax = axes[1 + i // cols, i % cols]
        ax.imshow(m, cmap="viridis")
        ax.set_title(f"last layer, head {i + 1}", fontsize=8)
    if title:
        fig.suptitle(label(title))
    return _save(fig, path)


def _tile(tiles, cols, fill):
    """(n, h, w[, C]) small images -> one mosaic, cols per row, 1-pixel gaps of `fill` between them."""
    tiles = np.asarray(tiles, dtype=np.float64)
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    mosaic = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1) + tiles.shape[3:], fill)
    for k, tile in enumerate(tiles):
        i, j = divmod(k, cols)
        mosaic[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = tile
    return mosaic


def plot_embedding_filters(components, path):
    """Principal components of the patch-embedding filters, (n, p, p, C), 7 per row, 1 inch each.

    Each component is scaled to [0, 1] on its own, as in the paper's Figure 7 (left).
    """
    rows, cols = _grid(len(components), 7)
    fig = _figure(cols * 1.0, rows * 1.0 + 0.4)
    ax = fig.subplots()
    mosaic = _tile([_unit(c) for c in components], cols, fill=1.0)  # white gaps
    _show(ax, (255 * mosaic).round().astype(np.uint8))
    ax.axis("off")
    ax.set_title(f"patch-embedding filters: first {len(components)} principal components", fontsize=9)
    return _save(fig, path)


def plot_position_similarity(similarity, path):
    """Cosine similarity of position embeddings (gh, gw, gh, gw): one small map per patch position.

    The small maps are tiled into one mosaic (one image, fast even for 24x24 grids), map (i, j)
    at row i, column j, as in the paper's Figure 7 (centre). Size: side = clip(0.45 * grid + 2, 4, 12)
    inches high and side + 1.5 wide (room for the colour bar).
    """
    gh, gw = similarity.shape[:2]
    mosaic = _tile(similarity.reshape(gh * gw, gh, gw), gw, fill=np.nan)  # NaN gaps show as blank
    side = float(np.clip(0.45 * max(gh, gw) + 2, 4, 12))
    fig = _figure(side + 1.5, side)
    ax = fig.subplots()
    im = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([j * (gw + 1) + (gw - 1) / 2 for j in range(gw)], [str(j + 1) for j in range(gw)], fontsize=7)
    ax.set_yticks([i * (gh + 1) + (gh - 1) / 2 for i in range(gh)], [str(i + 1) for i in range(gh)], fontsize=7)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title("position embedding similarity")
    fig.colorbar(im, ax=ax, shrink=0.7, label="cosine similarity")
    return _save(fig, path)


def plot_attention_distance(distances, path):
    """Mean attention distance (layers, heads) in pixels: one dot per head at each depth, the legend
    below the axes; 600 px wide, 450 px plus 20 per legend row high."""
    distances = np.asarray(distances)
    layers, heads = distances.shape
    legend_rows = math.ceil(heads / LEGEND_COLUMNS)
    fig = _figure(6, 4.5 + 0.2 * legend_rows)  # the legend's rows below the axes, inside the figure
    ax = fig.subplots()
    depth = np.arange(1, layers + 1)
    colors = colormaps["tab20" if heads <= 20 else "turbo"].resampled(heads)  # tab10 would repeat after 10 heads
    for h in range(heads):
        ax.scatter(depth, distances[:, h], s=14, color=colors(h), label=f"head {h + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(depth)
    ax.set_ylim(0, max(1.1 * distances.max(), 1.0))
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, ncol=min(heads, LEGEND_COLUMNS), loc="outside lower center", frameon=False, columnspacing=1.0)  # off the dots
    ax.set_title("mean attention distance per head")
    return _save(fig, path)
