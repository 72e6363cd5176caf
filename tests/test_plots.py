"""The pictures: cell drawings (nodes apart, no edge through a node, arrowheads outside their
node, labels not overlapping, numbered as the genotype JSON), alpha heatmaps (a scale that
shows near-uniform alphas, derive()'s picks and kept edges marked), learning curves (every
accuracy key), robustness / certified plots (table order, every attack in the legend, a clean
reference) and labelled image grids of a readable size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distsearch import plots
from distsearch.plots_cell import bezier, layout, route
from distsearch.robust.certify import certified_figure
from distsearch.robust.evaluate import robustness_figure
from search_spaces import Genotype
from search_spaces.darts import derive_cell
from search_spaces.operations import PRIMITIVES

DARTS_V2 = Genotype(
    normal=[
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1),
        ("skip_connect", 0),
        ("skip_connect", 0),
        ("dil_conv_3x3", 2),
    ],
    normal_concat=(2, 3, 4, 5),
    reduce=[
        ("max_pool_3x3", 0),
        ("max_pool_3x3", 1),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
        ("max_pool_3x3", 0),
        ("skip_connect", 2),
        ("skip_connect", 2),
        ("max_pool_3x3", 1),
    ],
    reduce_concat=(2, 3, 4, 5),
)
CHAIN = [("dil_conv_5x5", 0), ("dil_conv_5x5", 1), ("dil_conv_5x5", 0), ("dil_conv_5x5", 2)]
CHAIN += [("dil_conv_5x5", 2), ("dil_conv_5x5", 3), ("dil_conv_5x5", 1), ("dil_conv_5x5", 4)]
GENOTYPES = {
    "2 nodes": Genotype(CHAIN[:4], (2, 3), [("max_pool_3x3", 1), ("avg_pool_3x3", 1)] * 2, (3,)),
    "3 nodes": Genotype(CHAIN[:6], (2, 3, 4), [("sep_conv_5x5", 0), ("sep_conv_5x5", 0)] * 3, (2, 3, 4)),
    "4 nodes (DARTS V2)": DARTS_V2,
    "4 nodes, long edges": Genotype(CHAIN, (2, 3, 4, 5), [(o, j % 2) for o, j in CHAIN], (5,)),
}


def _overlaps(a, b) -> bool:
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


@pytest.mark.parametrize("name", GENOTYPES)
@pytest.mark.parametrize("reduce", [False, True])
def test_cell_drawing_is_legible(name, reduce):
    g = GENOTYPES[name]
    edges, concat = (g.reduce, g.reduce_concat) if reduce else (g.normal, g.normal_concat)
    pos = layout(len(edges) // 2)
    centres = {(round(n.x, 6), round(n.y, 6)) for n in pos.values()}
    assert len(centres) == len(pos)  # every node has its own place
    links = [(j, 2 + k // 2) for k, (_, j) in enumerate(edges)] + [(n, "out") for n in concat]
    t = np.linspace(0, 1, 201)
    for (s, d), (bend, t0, t1) in zip(links, route(links, pos)):
        a, b = pos[s], pos[d]
        pts = bezier(np.array([a.x, a.y]), np.array([b.x, b.y]), bend, t)[0]
        for other in pos.values():  # no edge runs through a node it does not join
            assert other in (a, b) or not other.inside(pts, 0.05).any(), (name, s, d, other.id)
        head = bezier(np.array([a.x, a.y]), np.array([b.x, b.y]), bend, np.array([t1]))[0]
        assert 0 < t0 < t1 < 1 and not b.inside(head).any() and b.inside(head, 0.1).all()  # arrowhead shows
    fig = plots.draw_cell(g, reduce)
    boxes = plots.label_boxes(fig)
    assert len(boxes) == len(pos) + len(edges)
    for i in range(len(boxes)):
        for j in range(i):
            assert not _overlaps(boxes[i], boxes[j]), (name, fig.axes[0].texts[i].get_text())
    texts = [t.get_text() for t in fig.axes[0].texts if t.get_gid() == "node-label"]
    assert texts[:2] == ["0: $c_{k-2}$", "1: $c_{k-1}$"]  # the genotype JSON's input indices
    assert texts[2:-1] == [str(2 + i) for i in range(len(edges) // 2)] and texts[-1] == "$c_{k}$"
    assert sorted(t.get_text() for t in fig.axes[0].texts if t.get_gid() == "edge-label") == sorted(o for o, _ in edges)


def test_alpha_heatmap_shows_near_uniform_alphas_and_what_derive_picks():
    gen = torch.Generator().manual_seed(0)
    nodes, ops = 3, list(PRIMITIVES)
    w = (0.05 * torch.randn(2 + 3 + 4, len(ops), generator=gen)).softmax(-1)
    w[0, ops.index("none")] = w[0].max() + 0.01  # the row maximum is 'none': derive skips it
    w = (w / w.sum(1, keepdim=True)).numpy()
    assert w.max() - w.min() < 0.05
    fig = plots.alpha_heatmap(w, ops, "test")
    ax = fig.axes[0]
    lo, hi = ax.images[0].get_clim()
    dev = np.abs(w - 1 / len(ops)).max()
    assert lo == pytest.approx(-dev) and hi == pytest.approx(dev)  # the scale spans the data, centred on uniform
    assert "uniform" in fig.axes[1].get_ylabel()
    gene = derive_cell(torch.as_tensor(w), tuple(ops), nodes)
    picks, kept = plots.derived_cells(w, ops, nodes)
    assert ops[picks[0]] != "none" and len(kept) == 2 * nodes
    start, want = 0, set()
    for i in range(nodes):  # the rows derive() keeps, with its ops
        for op, j in gene[2 * i : 2 * i + 2]:
            assert ops[picks[start + j]] == op
            want.add(start + j)
        start += 2 + i
    assert kept == want
    labels = ax.get_yticklabels()
    assert [t.get_text().removeprefix("✓ ") for t in labels] == ["0→2", "1→2", "0→3", "1→3", "2→3"] + [
        f"{j}→4" for j in range(4)
    ]
    assert {i for i, t in enumerate(labels) if t.get_fontweight() == "bold"} == kept
    boxed = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches}
    assert boxed == set(enumerate(picks))


def test_curves_plot_every_accuracy_key_in_percent_by_integer_epoch():
    history = [
        {"epoch": e, "train/loss": 1 / e, "train/acc": 0.1 * e, "test/robust_acc_pgd20": 0.05 * e, "lr": 0.1}
        for e in (1, 2, 3)
    ]
    history[-1]["val/robust_clean_acc"] = 0.5
    fig = plots.curves(history, "run")
    loss, acc = fig.axes
    names = {t.get_text() for t in acc.get_legend().get_texts()}
    assert names == {"train/acc", "test/robust_acc_pgd20", "val/robust_clean_acc"}
    assert {t.get_text() for t in loss.get_legend().get_texts()} == {"train/loss"}
    assert acc.get_ylabel() == "accuracy (%)" and loss.get_ylabel() == "loss"
    assert max(line.get_ydata()[-1] for line in acc.lines if np.isfinite(line.get_ydata()[-1])) == pytest.approx(50)
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in acc.get_xticks())


def _row(attack, norm, eps, acc):
    return {"attack": attack, "norm": norm, "eps": eps, "accuracy": acc, "n": 40}


def test_robustness_figure_follows_the_table_and_names_every_attack():
    rows = [_row("clean", "-", 0.0, 80.0)]
    for norm, eps in (("linf", 0.1), ("l2", 1.0)):
        rows += [_row("pgd-20", norm, eps, 50.0), _row("apgd-dlr", norm, eps, 40.0)]
    rows += [_row("cw", "l2", 1.0, 40.0), _row("worst", "linf", 0.1, 40.0), _row("worst", "l2", 1.0, 40.0)]
    fig = robustness_figure(rows, "run")
    assert [ax.get_title() for ax in fig.axes] == ["run linf", "run l2"]  # the table's order
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"pgd-20", "apgd-dlr", "cw", "clean"} <= legend and any(t.startswith("worst") for t in legend)
    l2 = fig.axes[1]
    markers = {line.get_marker() for line in l2.lines if line.get_marker() not in (None, "None", "")}
    assert len(markers) == 3  # cw and apgd-dlr coincide at 40 %, each with its own marker
    assert l2.lines[0].get_linewidth() > max(line.get_linewidth() for line in l2.lines[1:])  # worst first, under


def test_certified_figure_has_a_title_and_the_clean_accuracy():
    rows = [
        {"label": "run", "norm": "linf", "method": "ibp", "eps": e, "n": 40, "clean_acc": 75.0, "certified_acc": c}
        for e, c in ((0.01, 50.0), (0.02, 20.0))
    ]
    ax = certified_figure(rows).axes[0]
    assert "run" in ax.get_title() and "n = 40" in ax.get_title()
    assert any(np.allclose(line.get_ydata(), 75.0) for line in ax.lines)
    assert any("clean" in t.get_text() for t in ax.get_legend().get_texts())


def test_before_after_is_readable_and_marks_flipped_examples():
    x = torch.rand(6, 1, 8, 8)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    y, pred, pred_adv = torch.arange(6), torch.tensor([0, 1, 2, 0, 4, 5]), torch.tensor([0, 7, 2, 0, 4, 9])
    fig = plots.before_after(x, x_adv, y, pred, pred_adv, "pgd")
    h, w, _ = plots.to_rgb(fig).shape
    assert w >= 600 and h >= 300
    axes = fig.axes
    assert [a.get_ylabel().split("\n")[0] for a in axes[::6]] == ["original", "adversarial", "perturbation"]
    titles = [a.get_title() for a in axes[:6]]
    assert titles[1] == "y=1\npred 1 → 7 ✗" and titles[0] == "y=0\npred 0 → 0"
    assert [a.title.get_color() == "red" for a in axes[:6]] == [False, True, False, False, False, True]
    names = [f"class_{k}_long_name" for k in range(10)]  # the data set's names, cut to 9 characters
    titles = [a.get_title() for a in plots.before_after(x, x_adv, y, pred, pred_adv, "pgd", names=names).axes[:2]]
    assert titles == ["y=class_0_l\nclass_0_l → class_0_l", "y=class_1_l\nclass_1_l → class_7_l ✗"]


def test_image_grids_are_titled_and_an_inch_per_image():
    rgb = plots.to_rgb(plots.image_grid(torch.rand(16, 3, 8, 8), "explain/x"))
    assert rgb.shape[1] >= 750 and rgb.shape[0] >= 200  # 8 images a row, 2 rows, at 100 dpi
    one = plots.to_rgb(plots.image_grid(torch.rand(1, 1, 10, 80), "units"))
    assert one.shape[1] >= 750
