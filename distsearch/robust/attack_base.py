"""The Attack interface and the norm-ball geometry every attack shares.

An Attack is a callable `attack(model, x, y) -> x_adv` on images in [0, 1] (any input
normalisation lives inside the model). `Attack.__call__` puts the model in eval mode
(unless `eval_mode=False`, which adversarial training uses to craft in the model's own
mode, as Madry et al. 2018 do), freezes the parameters' requires_grad so only input
gradients are computed, and restores both afterwards, even on error.

Geometry: the threat model is B_ε(x) = {x' : ‖x' − x‖_p ≤ ε} ∩ [0, 1]^m with p ∈ {∞, 2}.
Clamping x + δ to the box only shrinks each |δ_i|, so "project to the ball, then clamp to
the box" lands inside the intersection.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")


def ce_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with one value per example (so gradients do not depend on batch size)."""
    return F.cross_entropy(logits, y, reduction="none")


@contextlib.contextmanager
def attack_context(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Eval mode (optionally) and frozen parameters inside; every module's mode and every
    parameter's requires_grad flag restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


def check_positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")


def check_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm: must be one of {', '.join(NORMS)}, got {norm!r}")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def l2_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shape [N]."""
    return t.flatten(1).norm(dim=1)


def normalize(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit p-norm: sign(g) for L∞, g/‖g‖₂ per example for L2."""
    if norm == "linf":
        return g.sign()
    return g / _bcast(l2_norm(g).clamp_min(1e-12), g)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Euclidean projection of δ onto the ε-ball of the given norm (per example)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    scale = (eps / l2_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * _bcast(scale, delta)


def clip_box(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """δ' such that x + δ' = clamp(x + δ, 0, 1)."""
    return (x + delta).clamp(0.0, 1.0) - x


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """δ uniform in the L∞ ball, or uniform in the L2 ball (Gaussian direction, radius ε·u^(1/d))."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        d = x[0].numel()
        direction = normalize(torch.randn_like(x), "l2")
        radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = direction * _bcast(radius, x)
    return clip_box(x, delta)


def is_label(y: torch.Tensor, n: int) -> bool:
    return y.dim() == 1 and y.shape[0] == n and not y.is_floating_point()


def success(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-example: prediction differs from y (untargeted) or equals the target y (targeted)."""
    pred = logits.argmax(dim=1)
    return pred == y if targeted else pred != y


def runner_up(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The most likely class other than y: the natural target of an untargeted minimum-distortion attack."""
    return logits.scatter(1, y[:, None], float("-inf")).argmax(dim=1)


def top_targets(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k]: the k classes other than y with the largest logits, most likely first: the targets
    of AutoAttack's targeted runs (APGD-T, FAB-T); k must be at most K − 1."""
    return logits.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices


class Attack:
    """Base class: subclasses implement `perturb(model, x, y)`; `__call__` handles modes and flags."""

    eval_mode: bool = True

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with attack_context(model, self.eval_mode):
            x_adv = self.perturb(model, x.detach(), y.detach())
        return x_adv.detach()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not callable(v))
        return f"{type(self).__name__}({fields})"
