"""Verification-based evaluation (DSRNA, Hosseini, Yang, Xie, CVPR 2021, section 5.2): certified
accuracy at a list of eps and the mean certified radius, from the sound bounds of
robust/bounds.py (IBP or CROWN-IBP) on a derived Network or a Supernet, in eval mode (BN by
running statistics). An example is certified at eps when the certified lower bound of its
margin f_y - max_{j != y} f_j over the eps-ball (intersected with [0, 1]) is > 0, by more than
a rounding slack of 100 machine epsilons of its largest |logit|, and the forward classifies it
right by more than that slack too (bounds.rounding_guard: float bounds are not rounded
outward). Rows are dicts; CSV / Markdown writers come from
robust/tables.py; the plot is certified accuracy against eps (matplotlib, Agg).
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..interrupt import raise_if_interrupted
from .attack_base import eval_mode
from .bounds import certified_radius, margin_lower_bound, rounding_guard
from .tables import Row, to_markdown, write_csv, write_markdown

__all__ = [
    "certified_accuracy",
    "certified_figure",
    "certify_table",
    "mean_certified_radius",
    "plot_certified_accuracy",
    "to_markdown",
    "write_csv",
    "write_markdown",
]


def _eps_list(eps: Sequence[float] | float | torch.Tensor) -> list[float]:
    """A list of budgets; one number (or a 0-d tensor) is a list of one."""
    if isinstance(eps, torch.Tensor):
        eps = eps.flatten().tolist()
    return [float(eps)] if isinstance(eps, numbers.Real) else [float(e) for e in eps]


def _chunks(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device, bar: tqdm | None = None):
    """Batches on `device`; `bar` advances once each batch is done."""
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        raise_if_interrupted()
        if bar is not None:
            bar.update(1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def certified_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float] | float,
    norm: str = "linf",
    method: str = "crown",
    batch_size: int = 128,
    bar: tqdm | None = None,
) -> list[float]:
    """Fraction of examples certified at each eps (one entry per eps); `bar` advances per batch."""
    eps_list = _eps_list(eps_list)
    counts = [0] * len(eps_list)
    with eval_mode(model):
        for xb, yb in _chunks(x, y, batch_size, _device(model), bar):
            right, slack = rounding_guard(model, xb, yb)
            for i, eps in enumerate(eps_list):
                bound = margin_lower_bound(model, xb, yb, float(eps), norm, method)
                counts[i] += int((right & (bound > slack)).sum())
    return [c / max(1, x.shape[0]) for c in counts]


@torch.no_grad()
def mean_certified_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    method: str = "crown",
    eps_max: float | None = None,
    steps: int = 12,
    batch_size: int = 128,
    bar: tqdm | None = None,
) -> tuple[float, torch.Tensor]:
    """(mean, per-example radii): bisection on eps; 0 for misclassified examples.
    eps_max defaults to 1 (L-inf) or sqrt(input size) (L2), the whole [0, 1] box."""
    if eps_max is None:
        eps_max = 1.0 if norm == "linf" else float(x[0].numel()) ** 0.5
    radii = []
    with eval_mode(model):
        for xb, yb in _chunks(x, y, batch_size, _device(model), bar):
            radii.append(certified_radius(model, xb, yb, norm, method, eps_max, steps).cpu())
    r = torch.cat(radii) if radii else torch.zeros(0)
    return (float(r.mean()) if r.numel() else 0.0), r


def certify_table(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_list: Sequence[float] | float,
    norm: str = "linf",
    method: str = "crown",
    *,
    radius: bool = True,
    batch_size: int = 128,
    progress: bool = False,
    **extra: Any,
) -> list[Row]:
    """One row per eps: norm, method, eps, clean accuracy, certified accuracy, and (with
    radius) the mean certified radius of the whole set (the same on every row). `extra`
    key/values (e.g. label="dsrna") are prepended to each row."""
    eps_list = _eps_list(eps_list)
    x = x.to(next(model.parameters()).dtype)
    with torch.no_grad(), eval_mode(model):
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in _chunks(x, y, batch_size, _device(model)))
    clean = 100.0 * correct / max(1, x.shape[0])  # percentages, like the game-based table
    batches = -(-int(x.shape[0]) // batch_size)
    with tqdm(total=batches * (1 + radius), desc="certify", unit="batch", disable=not progress) as bar:
        bar.set_postfix_str(f"certified accuracy at {len(eps_list)} eps")
        cert = certified_accuracy(model, x, y, eps_list, norm, method, batch_size, bar)
        bar.set_postfix_str("radius by bisection")
        mean_r = mean_certified_radius(model, x, y, norm, method, batch_size=batch_size, bar=bar)[0] if radius else None
    rows = []
    for eps, acc in zip(eps_list, cert):
        row: Row = dict(extra)
        row.update(
            norm=norm, method=method, eps=float(eps), n=int(x.shape[0]), clean_acc=clean, certified_acc=100.0 * acc
        )
        if radius:
            row["mean_certified_radius"] = mean_r
        rows.append(row)
    return rows


def plot_certified_accuracy(rows: Sequence[Row], path: str | os.PathLike[str], title: str = "") -> None:
    """certified_figure(rows, title) saved to `path` (its folder made when missing)."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    certified_figure(rows, title).savefig(path, dpi=120)


def certified_figure(rows: Sequence[Row], title: str = "") -> Any:
    """Certified accuracy vs eps, one line per (label, norm, method) group of the rows, each with
    its clean accuracy as a dotted reference line in the same colour; titled by default with
    what the rows hold (label, norm, method, n)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    groups: dict[str, list[Row]] = {}
    for r in rows:
        label = " ".join(str(r[k]) for k in ("label", "norm", "method") if k in r)
        groups.setdefault(label, []).append(r)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for i, (label, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["eps"])
        colour = f"C{i % 10}"
        ax.plot([r["eps"] for r in rs], [r["certified_acc"] for r in rs], marker="o", color=colour, label=label)
        if rs[0].get("clean_acc") is not None:
            clean = float(rs[0]["clean_acc"])
            ax.axhline(clean, ls=":", lw=1.5, color=colour, label=f"clean accuracy ({clean:.1f}%)")
    norms = sorted({str(r["norm"]) for r in rows if "norm" in r})
    ax.set_xlabel(f"ε ({norms[0]})" if len(norms) == 1 else "ε")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if not title:
        n = sorted({int(r["n"]) for r in rows if "n" in r})
        title = "certified accuracy: " + ", ".join(groups) + (f" (n = {n[0]})" if len(n) == 1 else "")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
