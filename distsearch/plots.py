"""Pictures people would rather look at than read: alpha heatmaps, cell drawings
(plots_cell.py), learning curves, labelled image grids (adversarial examples before and
after, explanations, units); matplotlib on the Agg canvas, no graphviz, returned as figures
or RGB arrays. Edges are named as the genotype JSON names nodes: 0 = c_{k-2}, 1 = c_{k-1},
2.. the intermediate nodes, so a heatmap row reads the same as an arrow of the cell drawing."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from search_spaces.darts import derive_cell

from .plots_cell import draw_cell, label_boxes, op_colour

__all__ = [
    "alpha_heatmap",
    "before_after",
    "curves",
    "draw_cell",
    "image_grid",
    "image_rows",
    "label_boxes",
    "op_colour",
    "save",
    "to_rgb",
]

ACC = re.compile(r"(^|[/_])acc($|_)")  # train/acc, val/robust_clean_acc, test/robust_acc_pgd20


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no global state to close."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def edge_labels(nodes: int) -> list[str]:
    """'j→i' per row of an alpha matrix, i and j numbered as in the genotype JSON."""
    return [f"{j}→{2 + i}" for i in range(nodes) for j in range(2 + i)]


def derived_cells(weights: np.ndarray, ops: Sequence[str], nodes: int) -> tuple[list[int], set[int]]:
    """(the op column derive() picks per row, the rows derive() keeps): search_spaces/darts.py's
    rule, max over ops except 'none', the top-2 inputs per node."""
    keep = [k for k, o in enumerate(ops) if o != "none"]
    picks = [keep[int(np.argmax(row[keep]))] for row in weights]
    kept, start = set(), 0
    gene = derive_cell(torch.as_tensor(weights), tuple(ops), nodes)
    for i in range(nodes):
        kept |= {start + j for _, j in gene[2 * i : 2 * i + 2]}
        start += 2 + i
    return picks, kept


def alpha_heatmap(weights: np.ndarray, ops: list[str] | tuple[str, ...], title: str) -> Figure:
    """softmax(alpha) minus uniform, one row per edge j→i, one column per op, on a diverging
    scale symmetric about 0 (uniform) that spans this figure's largest deviation. Outlined and
    annotated: the op derive() picks per edge; bold ✓ rows: the edges the genotype keeps."""
    k, n_ops = weights.shape
    nodes = int(round((-3 + (9 + 8 * k) ** 0.5) / 2))
    complete = sum(2 + i for i in range(nodes)) == k
    dev = weights - 1.0 / n_ops
    lim = max(float(np.abs(dev).max()), 1e-6)
    fig = new_figure((2.2 + 0.85 * n_ops, 1.6 + 0.3 * k))
    ax = fig.subplots()
    im = ax.imshow(dev, cmap="RdBu_r", aspect="auto", vmin=-lim, vmax=lim)
    ax.set_xticks(range(n_ops), ops, rotation=40, ha="right", fontsize=8)
    picks, kept = derived_cells(weights, ops, nodes) if complete else ([int(r.argmax()) for r in weights], set())
    names = edge_labels(nodes) if complete else [str(i) for i in range(k)]
    ax.set_yticks(range(k), [f"✓ {n}" if i in kept else n for i, n in enumerate(names)], fontsize=8)
    for i, label in enumerate(ax.get_yticklabels()):
        label.set_fontweight("bold" if i in kept else "normal")
        label.set_color("black" if i in kept or not kept else "dimgrey")
    digits = 3 if lim >= 0.005 else 4  # enough to tell the picks apart
    for i, j in enumerate(picks):
        strong = i in kept or not kept
        ax.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5),
                1,
                1,
                fill=False,
                edgecolor="black" if strong else "dimgrey",
                lw=1.8 if strong else 0.8,
                ls="-" if strong else "--",
            )
        )
        colour = "white" if abs(dev[i, j]) > 0.6 * lim else "black"
        ax.text(j, i, f"{weights[i, j]:.{digits}f}", ha="center", va="center", fontsize=6.5, color=colour)
    ax.set_ylabel("edge j→i (0 = $c_{k-2}$, 1 = $c_{k-1}$)", fontsize=8)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cb.set_label(f"softmax(α) − 1/{n_ops} (0 = uniform)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    ax.set_title(
        f"{title}\nboxed: derive()'s op per edge (max over ops but none), value = softmax(α); "
        "✓ bold: edges the genotype keeps",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


def curves(history: list[dict[str, float]], title: str) -> Figure:
    """Losses and accuracies (in %) per epoch: every key with 'loss' / an 'acc' word in it."""
    fig = new_figure((11, 3.8))
    axes = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    keys = sorted({k for r in history for k in r if not k.startswith("lr/")})
    panels = (
        ("loss", [k for k in keys if "loss" in k], 1.0),
        ("accuracy (%)", [k for k in keys if ACC.search(k)], 100.0),
    )
    for ax, (what, ks, scale) in zip(axes, panels):
        for k in ks:
            robust = "robust" in k and "clean" not in k
            ax.plot(
                epochs,
                [scale * r.get(k, float("nan")) for r in history],
                marker="o",
                label=k,
                lw=2.2 if robust else 1.3,
                ls="-" if robust else "--" if "clean" in k else "-",
            )
        ax.set(xlabel="epoch", ylabel=what, title=f"{title}: {what}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ks:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _hwc(img: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """A C×H×W tensor in [0, 1] as imshow wants it (grey images: H×W with a grey colormap)."""
    a = img.detach().float().cpu().clamp(0, 1).numpy()
    return (a[0], "gray") if a.shape[0] == 1 else (a.transpose(1, 2, 0), None)


def image_rows(
    rows: Sequence[tuple[str, torch.Tensor]],
    title: str,
    captions: Sequence[str] | None = None,
    flagged: Sequence[bool] | None = None,
    inches: float = 1.0,
) -> Figure:
    """A grid of images: one row per (row title, N×C×H×W tensor in [0, 1]), one column per
    example, each column captioned; `flagged` columns framed and captioned in red."""
    n = max(len(t) for _, t in rows)
    gap, left = 0.08, (1.1 if any(name for name, _ in rows) else 0.1)  # inches
    top = 0.2 + 0.2 * (title.count("\n") + 1) + (0.4 if captions else 0.0)
    width, height = left + (inches + gap) * n + 0.05, top + (inches + 2 * gap) * len(rows)
    fig = new_figure((width, height))
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            y = height - top - (r + 1) * (inches + 2 * gap) + gap
            ax = fig.add_axes(((left + c * (inches + gap)) / width, y / height, inches / width, inches / height))
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                a, cmap = _hwc(imgs[c])
                ax.imshow(a, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            else:
                ax.axis("off")
            red = bool(flagged is not None and c < len(flagged) and flagged[c])
            for side in ax.spines.values():
                side.set(color="red" if red else "darkgrey", lw=2.5 if red else 0.8)
            if r == 0 and captions is not None and c < len(captions):
                ax.set_title(captions[c], fontsize=7, color="red" if red else "black")
            if c == 0 and name:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10, y=1.0 - 0.1 / height, va="top")
    return fig


def image_grid(images: torch.Tensor, title: str, nrow: int = 8) -> Figure:
    """N×C×H×W images in [0, 1], nrow to a row, each about an inch wide, under a title; a
    single image (a grid made already, e.g. robust/units.py's) drawn 8 inches wide."""
    if len(images) == 1:
        a, cmap = _hwc(images[0])
        w = 8.0
        top = 0.2 + 0.2 * (title.count("\n") + 1)  # inches for the title
        fig = new_figure((w, top + w * a.shape[0] / a.shape[1]))
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - top / fig.get_figheight()))
        ax.imshow(a, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
        fig.suptitle(title, fontsize=10, y=1.0 - 0.1 / fig.get_figheight(), va="top")
        return fig
    rows = [("", images[i : i + nrow]) for i in range(0, len(images), nrow)]
    return image_rows(rows, title)


def before_after(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    pred: torch.Tensor,
    pred_adv: torch.Tensor,
    title: str,
    k: int = 12,
    names: Sequence[str] | None = None,
) -> Figure:
    """`distsearch attack`'s picture of its first k examples: rows original, adversarial and the
    perturbation magnified (grey = 0); columns captioned label, prediction before → after (as
    class numbers, or the data set's class names cut to 9 characters); the examples the attack
    flipped (right before, wrong after) framed in red."""
    k = min(k, len(x))
    diff = (x_adv[:k] - x[:k]).detach().float().cpu()
    peak = float(diff.abs().amax().clamp_min(1e-12))
    flipped = [bool(pred[i] == y[i] and pred_adv[i] != y[i]) for i in range(k)]

    def label(c: torch.Tensor) -> str:
        return names[int(c)][:9] if names else str(int(c))

    captions = [
        f"y={label(y[i])}\n{'' if names else 'pred '}{label(pred[i])} → {label(pred_adv[i])}"
        + (" ✗" if flipped[i] else "")
        for i in range(k)
    ]
    rows = [
        ("original", x[:k]),
        ("adversarial", x_adv[:k]),
        (f"perturbation\n×{0.5 / peak:.3g}\n(grey = 0)", 0.5 + 0.5 * diff / peak),
    ]
    head = f"{title}\ncaptions: true label y, prediction before → after; red ✗: flipped ({sum(flipped)} of {k})"
    return image_rows(rows, head, captions=captions, flagged=flipped)


def to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to an HxWx3 uint8 array."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save(fig: Figure, path: str, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi)
