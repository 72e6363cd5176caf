"""Drawings of a derived DARTS cell (Liu et al. 2019, figures 4-5): inputs on the left,
intermediate nodes staggered in the middle, the output on the right. Node ids are the
genotype JSON's input indices (0 = c_{k-2}, 1 = c_{k-1}, 2.. the intermediate nodes), so an
edge ["sep_conv_3x3", 2] into the third node is drawn 2 -> 4. Edges are quadratic Bézier
curves whose bend is chosen so that no edge passes through a node; each op name sits on its
edge in a white box placed where it overlaps no other label or node."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch
from matplotlib.path import Path

from search_spaces import Genotype
from search_spaces.operations import PRIMITIVES

INPUTS = ("c_{k-2}", "c_{k-1}")
BENDS = (0.0, 0.14, -0.14, 0.28, -0.28, 0.42, -0.42, 0.56, -0.56)  # control offset / chord length
LABEL_T = (0.5, 0.42, 0.58, 0.34, 0.66, 0.27, 0.73)  # where along an edge its op name may sit
SCALE = 0.8  # inches per data unit
Curve = tuple[np.ndarray, np.ndarray, float]  # (start, end, bend)


@dataclass(frozen=True)
class Node:
    id: int | str  # genotype index, or "out"
    x: float
    y: float
    w: float
    h: float
    round: bool = False  # a circle of diameter w

    def inside(self, p: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Which of the points p (..., 2) lie within `margin` of this node's shape."""
        dx, dy = p[..., 0] - self.x, p[..., 1] - self.y
        if self.round:
            return np.hypot(dx, dy) < self.w / 2 + margin
        return (np.abs(dx) < self.w / 2 + margin) & (np.abs(dy) < self.h / 2 + margin)


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def op_colour(op: str) -> str:
    """One colour per op, the same in every drawing (grey is kept for the output edges)."""
    i = PRIMITIVES.index(op) if op in PRIMITIVES else sum(map(ord, op))
    return PALETTE[i % len(PALETTE)]


def layout(nodes: int) -> dict[int | str, Node]:
    """Inputs 0 (top) and 1 (bottom) at x = 0, intermediate node 2 + i at x = 2.4 + 2.1 i on a
    zig-zag, the output after the last."""
    pos: dict[int | str, Node] = {0: Node(0, 0.0, 1.1, 1.3, 0.5), 1: Node(1, 0.0, -1.1, 1.3, 0.5)}
    for i in range(nodes):
        y = 0.0 if nodes == 1 else 0.8 if i % 2 == 0 else -0.8
        pos[2 + i] = Node(2 + i, 2.4 + 2.1 * i, y, 0.5, 0.5, round=True)
    pos["out"] = Node("out", 2.4 + 2.1 * (nodes - 1) + 2.0, 0.0, 0.75, 0.5)
    return pos


def bezier(p0: np.ndarray, p2: np.ndarray, bend: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(points at t, control point) of the quadratic curve p0 -> p2 bent by `bend` chords."""
    d = p2 - p0
    p1 = (p0 + p2) / 2 + bend * np.array([-d[1], d[0]])
    t = t[:, None]
    return (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2, p1


def route(
    edges: list[tuple[int, int | str]], pos: dict[int | str, Node], margin: float = 0.12
) -> list[tuple[float, float, float]]:
    """(bend, t0, t1) per edge (source, target): the least bent curve clear of every other node
    (by `margin`) and of the curves routed before it, shortest edges first; [t0, t1] is the part
    outside its two end nodes, so arrowheads show."""
    t = np.linspace(0.0, 1.0, 121)
    order = sorted(range(len(edges)), key=lambda k: abs(pos[edges[k][1]].x - pos[edges[k][0]].x))
    routed: list[np.ndarray] = []
    out: dict[int, tuple[float, float, float]] = {}
    for k in order:
        a, b = pos[edges[k][0]], pos[edges[k][1]]
        p0, p2 = np.array([a.x, a.y]), np.array([b.x, b.y])
        best = None
        for bend in BENDS:
            pts = bezier(p0, p2, bend, t)[0]
            free = ~a.inside(pts, 0.01) & ~b.inside(pts, 0.04)
            cost = abs(bend)
            for n in pos.values():
                if n is not a and n is not b:
                    cost += 100.0 * int(n.inside(pts, margin).any())
            for other in routed:  # running along an earlier curve reads as one edge
                near = np.linalg.norm(pts[free][:, None] - other[None], axis=-1).min(1) < 0.1
                cost += 0.02 * int(near.sum())
            if best is None or cost < best[0]:
                best = (cost, bend, pts, free)
        _, bend, pts, free = best
        idx = np.flatnonzero(free)
        routed.append(pts[free])
        curve = (p0, p2, bend)
        t0 = _cross(curve, a, 0.01, t[idx[0]], t[idx[0] - 1])
        out[k] = (bend, t0, _cross(curve, b, 0.04, t[idx[-1]], t[idx[-1] + 1]))
    return [out[k] for k in range(len(edges))]


def _cross(curve: Curve, node: Node, margin: float, outside: float, inside: float) -> float:
    """The t between `outside` and `inside` where the curve crosses node's outline + margin."""
    for _ in range(20):  # bisection
        mid = (outside + inside) / 2
        on = node.inside(bezier(*curve, np.array([mid]))[0], margin)[0]
        outside, inside = (outside, mid) if on else (mid, inside)
    return float(outside)


def _segment(p0: np.ndarray, p2: np.ndarray, bend: float, t0: float, t1: float) -> Path:
    """The part [t0, t1] of the curve, as one quadratic Bézier (its blossom)."""
    p1 = bezier(p0, p2, bend, np.array([0.0]))[1]
    b = lambda u, v: (1 - u) * (1 - v) * p0 + ((1 - u) * v + u * (1 - v)) * p1 + u * v * p2  # noqa: E731
    return Path([b(t0, t0), b(t0, t1), b(t1, t1)], [Path.MOVETO, Path.CURVE3, Path.CURVE3])


def _overlap(a, b) -> float:  # two display-space Bboxes: the area they share
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(0.0, w) * max(0.0, h)


def _place_labels(ax, labels: list[tuple[str, str, np.ndarray, np.ndarray, float]]) -> None:
    """Each (op, colour, p0, p2, bend) edge's op name on its curve, at the t of LABEL_T where its
    box overlaps the fewest pixels of nodes and labels placed before, then hides the fewest
    points of other edges."""
    renderer = ax.figure.canvas.get_renderer()
    taken = [t.get_window_extent(renderer) for t in ax.texts]  # the node labels and patches
    taken += [p.get_window_extent(renderer) for p in ax.patches if not isinstance(p, FancyArrowPatch)]
    t = np.linspace(0.05, 0.95, 60)
    curves = [ax.transData.transform(bezier(p0, p2, bend, t)[0]) for _, _, p0, p2, bend in labels]
    for k, (op, colour, p0, p2, bend) in enumerate(labels):
        others = np.concatenate([c for i, c in enumerate(curves) if i != k] or [np.zeros((0, 2))])
        best = None
        for u in LABEL_T:
            pt = bezier(p0, p2, bend, np.array([u]))[0][0]
            txt = ax.text(
                *pt,
                op,
                fontsize=7,
                color=colour,
                ha="center",
                va="center",
                zorder=5,
                gid="edge-label",
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor=colour, lw=0.6),
            )
            box = txt.get_window_extent(renderer).expanded(1.06, 1.15)
            hidden = int(
                (
                    (others[:, 0] > box.x0)
                    & (others[:, 0] < box.x1)
                    & (others[:, 1] > box.y0)
                    & (others[:, 1] < box.y1)
                ).sum()
            )
            cost = sum(_overlap(box, other) for other in taken) + 3.0 * hidden + abs(u - 0.5)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, txt, box)
            else:
                txt.remove()
        taken.append(best[2])


def draw_cell(genotype: Genotype, reduce: bool = False) -> Figure:
    """The derived cell as a graph, numbered as the genotype JSON numbers its inputs."""
    edges = genotype.reduce if reduce else genotype.normal
    concat = genotype.reduce_concat if reduce else genotype.normal_concat
    nodes = len(edges) // 2
    pos = layout(nodes)
    links: list[tuple[int, int | str]] = [(j, 2 + k // 2) for k, (_, j) in enumerate(edges)]
    links += [(n, "out") for n in concat]
    routes = route(links, pos)

    ys = [n.y for n in pos.values()]
    for (s, d), (bend, _, _) in zip(links, routes):  # room for the bulge of bent curves
        pts = bezier(np.array([pos[s].x, pos[s].y]), np.array([pos[d].x, pos[d].y]), bend, np.linspace(0, 1, 21))[0]
        ys += list(pts[:, 1])
    x0, x1 = -0.8, pos["out"].x + 0.55
    y0, y1 = min(ys) - 0.45, max(ys) + 0.45
    top, bottom = 0.45, 0.4  # inches for the title and the caption
    fig = Figure(figsize=((x1 - x0) * SCALE, (y1 - y0) * SCALE + top + bottom))
    FigureCanvasAgg(fig)
    h = fig.get_figheight()
    ax = fig.add_axes((0.0, bottom / h, 1.0, (y1 - y0) * SCALE / h))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.axis("off")

    for n in pos.values():
        if n.round:
            ax.add_patch(Circle((n.x, n.y), n.w / 2, facecolor="wheat", edgecolor="black", lw=1, zorder=3))
            text = str(n.id)
        else:
            ax.add_patch(
                FancyBboxPatch(
                    (n.x - n.w / 2, n.y - n.h / 2),
                    n.w,
                    n.h,
                    boxstyle="round,pad=0,rounding_size=0.12",
                    facecolor="palegreen" if n.id == "out" else "lightblue",
                    edgecolor="black",
                    lw=1,
                    zorder=3,
                )
            )
            text = "$c_{k}$" if n.id == "out" else f"{n.id}: ${INPUTS[int(n.id)]}$"
        ax.text(n.x, n.y, text, ha="center", va="center", fontsize=10, zorder=4, gid="node-label")

    labels = []
    for k, ((s, d), (bend, t0, t1)) in enumerate(zip(links, routes)):
        p0, p2 = np.array([pos[s].x, pos[s].y]), np.array([pos[d].x, pos[d].y])
        op = edges[k][0] if d != "out" else None
        colour = op_colour(op) if op else "grey"
        ax.add_patch(
            FancyArrowPatch(
                path=_segment(p0, p2, bend, t0, t1),
                arrowstyle="-|>,head_length=0.5,head_width=0.25",
                mutation_scale=14 if op else 11,
                color=colour,
                lw=1.6 if op else 1.0,
                ls="-" if op else (0, (4, 3)),
                zorder=2,
                shrinkA=0,
                shrinkB=0,
            )
        )
        if op:
            labels.append((op, colour, p0, p2, bend))

    _place_labels(ax, labels)

    fig.suptitle("reduction cell" if reduce else "normal cell", fontsize=11, y=1 - 0.12 / fig.get_figheight())
    fig.text(
        0.5,
        0.12 / fig.get_figheight(),
        "node ids = the genotype JSON's input indices (0, 1: cell inputs; 2..: intermediate nodes)\n"
        "dashed: concatenated into $c_{k}$",
        ha="center",
        va="bottom",
        fontsize=7,
        color="dimgrey",
    )
    return fig


def label_boxes(fig: Figure) -> list:
    """Display-space bounding boxes of the node and edge labels of a draw_cell figure."""
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    return [t.get_window_extent(renderer) for t in ax.texts if t.get_gid() in ("node-label", "edge-label")]
