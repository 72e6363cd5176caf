"""Pictures people would rather look at than read: alpha heatmaps and cell drawings
(matplotlib, Agg backend, no graphviz needed), returned as figures or RGB arrays."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from search_spaces import Genotype  # noqa: E402


def edge_labels(nodes: int) -> list[str]:
    names = ["c_{k-2}", "c_{k-1}"] + [f"n{i}" for i in range(nodes)]
    return [f"{names[j]}->n{i}" for i in range(nodes) for j in range(2 + i)]


def alpha_heatmap(weights: np.ndarray, ops: list[str] | tuple[str, ...], title: str) -> Figure:
    """Heatmap of softmax(alpha): one row per edge, one column per candidate op."""
    k = weights.shape[0]
    nodes = int((-3 + (9 + 8 * k) ** 0.5) / 2)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(ops), 0.9 + 0.32 * k))
    im = ax.imshow(weights, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(ops)), ops, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), edge_labels(nodes) if sum(2 + i for i in range(nodes)) == k else range(k), fontsize=7)
    for i in range(k):
        j = int(weights[i].argmax())
        dark = weights[i, j] < 0.5 * weights.max()
        ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def draw_cell(genotype: Genotype, reduce: bool = False) -> Figure:
    """The derived cell as a graph: inputs on the left, nodes in the middle, output right."""
    edges = genotype.reduce if reduce else genotype.normal
    concat = genotype.reduce_concat if reduce else genotype.normal_concat
    nodes = len(edges) // 2
    pos = {0: (0.0, 0.75), 1: (0.0, 0.25)}
    for i in range(nodes):
        pos[2 + i] = (1.0 + i, 0.5 + 0.3 * ((-1) ** i) * (i % 2 + 0.2))
    out = (nodes + 1.0, 0.5)
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * nodes, 3.2))
    names = {0: "c_{k-2}", 1: "c_{k-1}", **{2 + i: str(i) for i in range(nodes)}}
    colours = plt.get_cmap("tab10")
    ops = sorted({op for op, _ in edges})
    for k, (op, j) in enumerate(edges):
        (x0, y0), (x1, y1) = pos[j], pos[2 + k // 2]
        c = colours(ops.index(op) % 10)
        rad = 0.25 if j == 2 + k // 2 - 1 else 0.1 * (k % 2 * 2 - 1)
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops=dict(arrowstyle="->", color=c, lw=1.5, connectionstyle=f"arc3,rad={rad}"),
        )
        ax.text(
            (x0 + x1) / 2,
            (y0 + y1) / 2 + rad * 0.3,
            op,
            fontsize=7,
            color=c,
            ha="center",
            bbox=dict(facecolor="white", edgecolor="none", alpha=0.7, pad=0.5),
        )
    for n in concat:
        ax.annotate("", xy=out, xytext=pos[n], arrowprops=dict(arrowstyle="->", color="grey", lw=0.8, ls="--"))
    for n, (x, y) in pos.items():
        ax.text(
            x,
            y,
            names[n],
            ha="center",
            va="center",
            fontsize=9,
            bbox=dict(boxstyle="round", facecolor="lightblue" if n < 2 else "wheat"),
        )
    ax.text(*out, "c_{k}", ha="center", va="center", fontsize=9, bbox=dict(boxstyle="round", facecolor="palegreen"))
    ax.set_xlim(-0.5, nodes + 1.5)
    ax.set_ylim(-0.1, 1.1)
    ax.axis("off")
    ax.set_title("reduction cell" if reduce else "normal cell", fontsize=10)
    fig.tight_layout()
    return fig


def to_rgb(fig: Figure) -> np.ndarray:
    """Render a figure to an HxWx3 uint8 array and close it."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def save(fig: Figure, path: str) -> None:
    fig.savefig(path, dpi=120)
    plt.close(fig)
