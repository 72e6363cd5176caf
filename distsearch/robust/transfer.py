"""Cross-model generalisation of adversarial examples (Szegedy et al. 2014, section 4.2, tables 2-4).

Adversarial examples are made on each source model (models with other hyperparameters, or
trained on disjoint halves of the training set), and every model's error rate (%) on them is
tabulated beside a Gaussian-noise baseline of the same distortion: per example, noise
N(0, I) scaled so that, clamped to [0, 1], it has the adversarial perturbation's L2 norm.
Rows: 'clean', then for each source S the row 'S' (its adversarial examples) and the row
'noise(S)'; columns: 'examples', 'fooled', 'distortion', then one error-rate column per model.
The error rates are over all the images, as in Szegedy's tables: an image a model gets wrong
clean counts for it in every row (the 'clean' row shows how many). 'fooled' is the source's
own success: of the images S classifies right, the % whose example (or noise) S gets wrong.
'distortion' is Szegedy's sqrt(Σ(x' − x)²/n) averaged over those fooling examples, their
"mean minimum distortion" for L-BFGS (an image S already gets wrong needs no perturbation, a
failed attack makes none: neither is counted); None (an empty cell) when none fools S. A noise row's distortion
is over the same images as its source's row (the noise has their sizes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .attack_base import Attack, eval_mode, seeded
from .tables import Row, write_csv, write_markdown

__all__ = ["distortion", "gaussian_like", "plot_heatmap", "transfer_table", "write_csv", "write_markdown"]


def distortion(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example sqrt(Σ(x' − x)² / n), n the number of input values (Szegedy et al.'s measure)."""
    return ((x_adv - x) ** 2).flatten(1).mean(1).sqrt()


def gaussian_like(
    x: torch.Tensor, x_adv: torch.Tensor, generator: torch.Generator | None = None, iters: int = 20
) -> torch.Tensor:
    """x plus Gaussian noise, clamped to the box, with the same per-example L2 norm as x_adv − x:
    the noise's scale is refitted after clamping (fixed-point iterations), so the sizes match."""
    noise = torch.randn(x.shape, generator=generator).to(x)
    target = (x_adv - x).flatten(1).norm(dim=1)
    shape = (-1, *([1] * (x.dim() - 1)))
    scale = target / noise.flatten(1).norm(dim=1).clamp_min(1e-12)
    for _ in range(iters):
        got = ((x + noise * scale.view(shape)).clamp(0.0, 1.0) - x).flatten(1).norm(dim=1)
        scale = (scale * target / got.clamp_min(1e-12)).clamp(max=1e3)
    return (x + noise * scale.view(shape)).clamp(0.0, 1.0)


def _batched(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [attack(model, x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    )


@torch.no_grad()
def _wrong(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per image: whether `model` misclassifies it."""
    with eval_mode(model):
        return torch.cat(
            [model(x[i : i + batch_size]).argmax(1) != y[i : i + batch_size] for i in range(0, len(x), batch_size)]
        )


def _percent(mask: torch.Tensor) -> float:
    return 100.0 * float(mask.sum()) / max(1, len(mask))


def transfer_table(
    models: Mapping[str, nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    seed: int = 0,
    batch_size: int = 256,
) -> list[Row]:
    """The transfer table (see the module docstring) for `attack` made on each model in turn."""
    if len(models) < 1:
        raise ValueError("models: need at least one model")
    g = torch.Generator().manual_seed(seed)
    with seeded(seed, *models.values()):  # the attacks' random starts; the caller's RNG left as it was
        clean = {t: _wrong(m, x, y, batch_size) for t, m in models.items()}
        rows: list[Row] = [
            {"examples": "clean", "fooled": 0.0, "distortion": 0.0, **{t: _percent(w) for t, w in clean.items()}}
        ]
        for source, model in models.items():
            x_adv = _batched(attack, model, x, y, batch_size)
            x_noise = gaussian_like(x, x_adv, g)
            right = ~clean[source]
            found = None  # the examples that fool the source: both rows' distortion is over them
            for label, xs in ((source, x_adv), (f"noise({source})", x_noise)):
                wrong = {t: _wrong(m, xs, y, batch_size) for t, m in models.items()}
                if found is None:
                    found = right & wrong[source]
                rows.append(
                    {
                        "examples": label,
                        "fooled": _percent(wrong[source][right]),
                        "distortion": float(distortion(xs[found], x[found]).mean()) if found.any() else None,
                        **{t: _percent(w) for t, w in wrong.items()},
                    }
                )
    return rows


def plot_heatmap(rows: Sequence[Row], path: str | os.PathLike[str], title: str = "transfer error rate (%)") -> None:
    """Heatmap: rows = whose examples (and noise baselines), columns = evaluated model."""
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global backend state

    targets = [k for k in rows[0] if k not in ("examples", "fooled", "distortion")]
    labels = [f"{r['examples']} (d={'-' if r['distortion'] is None else format(r['distortion'], '.3f')})" for r in rows]
    data = [[float(r[t]) for t in targets] for r in rows]
    fig = Figure(figsize=(1.2 * len(targets) + 3, 0.5 * len(rows) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(data, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(targets)), targets, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.set(xlabel="evaluated on", ylabel="examples from", title=title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
