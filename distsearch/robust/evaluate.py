"""Game-based robustness evaluation: accuracy under attack at a list of budgets and norms.

As reported in DSRNA (Hosseini et al. 2021, section 5.2): clean accuracy and accuracy under
FGSM (FGM for L2; Goodfellow et al. 2015), PGD-20 and PGD-100 (Madry et al. 2018, random
start, step 2.5·ε/steps), AutoAttack's APGD-CE, APGD-DLR and APGD-T (Croce & Hein 2020, 100
steps; APGD-T over the 9 most likely other classes) and Carlini–Wagner L2 (Carlini & Wagner
2017; the found example projected onto the ε-ball, so "robust" means no adversarial example
within ε was found). C&W is L2-only and is skipped for L∞ rows. AutoAttack's gradient-free
Square Attack ("square", Andriushchenko et al. 2020, 5 000 queries) and its minimum-norm FAB-T
("fab-t", Croce & Hein 2020, 100 steps towards each of the 9 most likely other classes; a point
found beyond ε does not count) run on request only. The preset "autoattack" names AutoAttack's
standard ensemble, apgd-ce apgd-t fab-t square; it mixes with other names (`expand_attacks`).
Accuracies are percentages over the given set; under an attack an image counts when the model
is right on it and on the attack's output (δ = 0 is in the ball), so no row exceeds the clean
one; a `worst` row per budget counts the examples that survive every attack (the per-example
minimum, as AutoAttack reports).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..interrupt import raise_if_interrupted
from .apgd import APGD, APGDT
from .attack_base import Attack, check_norm, eval_mode, seeded
from .attacks import FGM, FGSM, PGD
from .fab import FABT
from .lbfgs_cw import CarliniWagnerL2
from .square import Square
from .tables import Row, write_csv, write_markdown

__all__ = [
    "DEFAULT_ATTACKS",
    "EVAL_ATTACKS",
    "PRESETS",
    "accuracies",
    "accuracy",
    "expand_attacks",
    "game_table",
    "plot_robustness",
    "robustness_figure",
    "right_masks",
    "write_csv",
    "write_markdown",
]

AttackFactory = Callable[[float, str], Attack | None]


def _cw(eps: float, norm: str, **kw: Any) -> Attack | None:
    return CarliniWagnerL2(eps=eps, **kw) if norm == "l2" else None


EVAL_ATTACKS: dict[str, AttackFactory] = {
    "fgsm": lambda eps, norm: FGSM(eps) if norm == "linf" else FGM(eps),
    "pgd-20": lambda eps, norm: PGD(eps, steps=20, norm=norm),
    "pgd-100": lambda eps, norm: PGD(eps, steps=100, norm=norm),
    "apgd-ce": lambda eps, norm: APGD(eps, steps=100, norm=norm, loss="ce"),
    "apgd-dlr": lambda eps, norm: APGD(eps, steps=100, norm=norm, loss="dlr"),
    "apgd-t": lambda eps, norm: APGDT(eps, steps=100, norm=norm),
    "square": lambda eps, norm: Square(eps, norm=norm, n_queries=5000),
    "fab-t": lambda eps, norm: FABT(eps, norm=norm, steps=100),
    "cw": _cw,
}

DEFAULT_ATTACKS = ("fgsm", "pgd-20", "pgd-100", "apgd-ce", "apgd-dlr", "apgd-t", "cw")  # square, fab-t: on request
PRESETS = {"autoattack": ("apgd-ce", "apgd-t", "fab-t", "square")}  # AutoAttack's standard version
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}  # the DLR losses' denominators need that many logits


def expand_attacks(names: Sequence[str]) -> list[str]:
    """The attack names with each preset replaced by its attacks, in order, each name once; an
    unknown name raises ValueError naming it."""
    out: list[str] = []
    for name in names:
        if name not in EVAL_ATTACKS and name not in PRESETS:
            choices = ", ".join([*EVAL_ATTACKS, *PRESETS])
            raise ValueError(f"attacks: unknown attack {name!r}; choose from {choices}")
        out += [a for a in PRESETS.get(name, (name,)) if a not in out]
    return out


def right_masks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack | None = None,
    batch_size: int = 256,
    bar: tqdm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (clean, robust) booleans (cpu) of the model in eval mode on x; mode restored.
    An example is robust when the model is right on it and on attack(model, x, y): δ = 0 lies in
    every ball, so the clean point is one of the attacker's choices and robust implies clean
    (robust = clean without an attack). `bar`: advanced by one per batch."""
    device = next(model.parameters()).device
    clean, robust = [], []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            with torch.no_grad():
                right = model(xb).argmax(1) == yb
            clean.append(right.cpu())
            if attack is not None:
                xa = attack(model, xb, yb)
                with torch.no_grad():
                    robust.append((right & (model(xa).argmax(1) == yb)).cpu())
            raise_if_interrupted()
            if bar is not None:
                bar.update(1)
    c = torch.cat(clean) if clean else torch.zeros(0, dtype=torch.bool)
    return c, (torch.cat(robust) if attack is not None and robust else c)


def accuracies(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack | None = None,
    batch_size: int = 256,
    bar: tqdm | None = None,
) -> tuple[float, float]:
    """(clean, robust) accuracy (%) over x, from `right_masks`; robust <= clean."""
    clean, robust = right_masks(model, x, y, attack, batch_size, bar)
    n = max(1, x.shape[0])
    return 100.0 * int(clean.sum()) / n, 100.0 * int(robust.sum()) / n


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack | None = None,
    batch_size: int = 256,
    bar: tqdm | None = None,
) -> float:
    """Accuracy (%) on x, or the robust accuracy under `attack` (see `accuracies`)."""
    return accuracies(model, x, y, attack, batch_size, bar)[1]


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), eval_mode(model):
        return model(x.to(next(model.parameters()).device)).shape[1]


def game_table(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: dict[str, Sequence[float] | float],
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    batch_size: int = 256,
    cw_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[Row]:
    """Rows {attack, norm, eps, accuracy, n}: one clean row, then each attack at each (norm, ε),
    and where more than one attack ran at a (norm, ε), a `worst` row: the examples right on
    every attack's output (each attack finds different examples, so this per-example minimum
    is the table's best estimate of robust accuracy, lower than any one attack's row).
    `attacks`: names of EVAL_ATTACKS or PRESETS ("autoattack"), see `expand_attacks`.
    `eps` maps a norm ('linf' or 'l2') to its budgets, e.g. {'linf': [0.1, 0.3], 'l2': 1.0}.
    `progress`: a bar over every (attack, budget, batch) on stderr. `seed` seeds the attacks'
    random starts and Square's draws; the caller's RNG state is left as it was."""
    eps = {norm: [budgets] if isinstance(budgets, numbers.Real) else list(budgets) for norm, budgets in eps.items()}
    for norm, budgets in eps.items():
        check_norm(norm)
        for e in budgets:
            if not isinstance(e, numbers.Real) or isinstance(e, bool) or not 0 < e < math.inf:
                raise ValueError(f"eps: budgets must be finite numbers > 0, got {e!r} for norm {norm!r}")
    eps = {norm: [float(e) for e in budgets] for norm, budgets in eps.items()}
    attacks = expand_attacks(attacks)
    with seeded(seed, model):  # the attacks' random starts: a table is reproducible
        return _game_rows(model, x, y, eps, attacks, batch_size, cw_kwargs, progress, seed)


def _game_rows(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: dict[str, Sequence[float]],
    attacks: list[str],
    batch_size: int,
    cw_kwargs: dict[str, Any] | None,
    progress: bool,
    seed: int,
) -> list[Row]:
    """game_table's rows, the arguments checked, under its seed (Square's own generator too)."""
    n = int(x.shape[0])
    if n and any(MIN_CLASSES.get(a, 0) > 2 for a in attacks):
        classes = _num_classes(model, x[:1])
        for name in [a for a in attacks if MIN_CLASSES.get(a, 0) > classes]:
            msg = f"attacks: {name} needs at least {MIN_CLASSES[name]} classes, the model has {classes}; skipped"
            warnings.warn(msg, stacklevel=2)
        attacks = [a for a in attacks if MIN_CLASSES.get(a, 0) <= classes]
    plan = []
    for norm, budgets in eps.items():
        for e in budgets:
            for name in attacks:
                attack = _cw(e, norm, **(cw_kwargs or {})) if name == "cw" else EVAL_ATTACKS[name](e, norm)
                if isinstance(attack, Square):  # draws from a generator of its own
                    attack.seed = seed
                if attack is not None:
                    plan.append(("fgm" if name == "fgsm" and norm == "l2" else name, norm, float(e), attack))
    if attacks and not plan:  # cw alone at L-inf budgets: a table of the clean row only
        raise ValueError(f"attacks: {', '.join(attacks)} run(s) at L2 budgets only; give L2 budgets (eps['l2'])")
    batches = -(-n // batch_size)
    rows: list[Row] = []
    worst: dict[tuple[str, float], list[torch.Tensor]] = {}

    def row(label: str, norm: str, e: float, right: torch.Tensor) -> Row:
        return {"attack": label, "norm": norm, "eps": e, "accuracy": 100.0 * int(right.sum()) / max(1, n), "n": n}

    with tqdm(total=(1 + len(plan)) * batches, desc="evaluate", unit="batch", disable=not progress) as bar:
        for label, norm, e, attack in [("clean", "-", 0.0, None), *plan]:
            bar.set_postfix_str(label if attack is None else f"{label} {norm} eps={e:g}")
            right = right_masks(model, x, y, attack, batch_size, bar)[1]
            rows.append(row(label, norm, e, right))
            if attack is not None:
                worst.setdefault((norm, e), []).append(right)
    for (norm, e), masks in worst.items():
        if len(masks) > 1:
            rows.append(row("worst", norm, e, torch.stack(masks).all(0)))
    return rows


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">")
DASHES = ("-", "--", "-.", ":")


def plot_robustness(rows: Sequence[Row], path: str | os.PathLike[str], title: str = "") -> None:
    """robustness_figure(rows, title) saved to `path`."""
    robustness_figure(rows, title).savefig(path, dpi=120)


def robustness_figure(rows: Sequence[Row], title: str = "") -> Any:
    """Robust accuracy vs ε, one panel per norm in the table's order, one line per attack, clean
    accuracy dashed. Attacks that coincide stay visible: `worst` is a wide translucent band drawn
    first, each attack its own hollow marker (largest first, so equal points nest; none at ε = 0, where
    every line starts from the clean accuracy) and dash."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state

    norms = list(dict.fromkeys(r["norm"] for r in rows if r["norm"] != "-"))
    clean = next((r["accuracy"] for r in rows if r["attack"] == "clean"), None)
    attacks = [a for a in dict.fromkeys(r["attack"] for r in rows if r["norm"] != "-") if a != "worst"]
    style = {a: (MARKERS[i % len(MARKERS)], DASHES[i % len(DASHES)], f"C{i % 10}") for i, a in enumerate(attacks)}
    fig = Figure(figsize=(4.6 * max(1, len(norms)) + 1.8, 4))
    axes = fig.subplots(1, max(1, len(norms)), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        names = list(dict.fromkeys(r["attack"] for r in rows if r["norm"] == norm))
        for name in sorted(names, key=lambda a: a != "worst"):  # worst first, underneath
            pts = sorted(
                (float(r["eps"]), float(r["accuracy"])) for r in rows if r["norm"] == norm and r["attack"] == name
            )
            xs = [0.0] + [p[0] for p in pts]
            ys = [clean if clean is not None else 100.0] + [p[1] for p in pts]
            if name == "worst":
                ax.plot(xs, ys, color="black", lw=8, alpha=0.22, solid_capstyle="round")
                continue
            marker, dash, colour = style[name]
            size = 12 - 6 * attacks.index(name) / max(1, len(attacks) - 1)
            ax.plot(xs, ys, ls=dash, color=colour, alpha=0.9, lw=1.4)
            ax.plot(xs[1:], ys[1:], ls="none", marker=marker, ms=size, mfc="none", mec=colour, mew=1.4)
        if clean is not None:
            ax.axhline(clean, linestyle="--", color="grey", linewidth=1)
        ax.set(xlabel=f"ε ({norm})", ylabel="accuracy (%)", ylim=(0, 100), title=f"{title} {norm}".strip())
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", lw=8, alpha=0.22, label="worst (per example)")]
    handles += [Line2D([], [], ls=d, marker=m, mfc="none", mec=c, color=c, label=a) for a, (m, d, c) in style.items()]
    handles += [Line2D([], [], ls="--", color="grey", label="clean")] if clean is not None else []
    if not any(r["attack"] == "worst" for r in rows):
        handles = handles[1:]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    return fig
