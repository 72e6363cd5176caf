"""Gradient attacks and the attack registry; every attack is `attack(model, x, y) -> x_adv`.

- FGSM (Goodfellow et al. 2015, eq. 3): x' = clip_[0,1](x + ε·sign(∇_x L(f(x), y))).
- FGM (Miyato et al. 2017, eq. 7): x' = clip_[0,1](x + ε·g/‖g‖₂), g = ∇_x L, per example.
- PGD (Madry et al. 2018, eq. 2.1): random start in B_ε(x), then
  x_{t+1} = Π_{B_ε(x) ∩ [0,1]^m}(x_t + a·s(∇_x L)), s = sign (L∞) or g/‖g‖₂ (L2); the default
  step a = 2.5·ε/steps (Madry et al.'s rule). Restarts keep, per example, the run that
  succeeds, ties broken by the larger objective.
  Targeted attacks descend L(f(x'), target) with y the target. `loss_fn(logits, y)` replaces
  the per-example cross-entropy, and y may then be anything it accepts: LeaSE passes
  y = argmax f(x) to change the explainer's own prediction; TRADES passes y = softmax f(x)
  with a KL loss.
Szegedy's box-constrained L-BFGS and Carlini–Wagner L2 are in lbfgs_cw.py, APGD (AutoAttack's
step-size-free PGD with the CE, DLR or targeted DLR loss: APGD-T) in apgd.py, the gradient-free
Square Attack in square.py, the minimum-norm FAB and its targeted form FAB-T in fab.py.
"""

from __future__ import annotations

import torch
from torch import nn

from .apgd import APGD, APGDT
from .attack_base import (
    Attack,
    LossFn,
    ce_per_example,
    check_int,
    check_norm,
    check_positive,
    clip_box,
    is_label,
    normalize,
    project,
    random_start,
    success,
)
from .fab import FAB, FABT
from .lbfgs_cw import LBFGS, CarliniWagnerL2
from .registry import build_registered
from .square import Square


def _input_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, sign: float):
    """∇_x of sign·Σ_i loss_i at x_adv, and the per-example objective (detached)."""
    x_adv = x_adv.detach().requires_grad_(True)
    obj = loss_fn(model(x_adv), y)
    (g,) = torch.autograd.grad(sign * obj.sum(), x_adv)
    return g, obj.detach()


class FGSM(Attack):
    """FGSM (Goodfellow et al. 2015, eq. 3): one signed-gradient step, x' = clip(x + ε·sign ∇ₓL).

    eps: the L∞ budget (8/255). targeted: descend L(f(x'), y), y the target (False). loss_fn:
    replaces the per-example cross-entropy; y is then whatever it takes, [N, ...] (None).
    eval_mode: craft in eval mode (True). check_range: check x ∈ [0, 1], a host sync (True)."""

    def __init__(
        self,
        eps: float = 8 / 255,
        targeted: bool = False,
        loss_fn: LossFn | None = None,
        eval_mode: bool = True,
        check_range: bool = True,
    ):
        self.eps = check_positive("eps", eps)
        self.targeted, self.loss_fn, self.eval_mode, self.check_range = targeted, loss_fn, eval_mode, check_range

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g, _ = _input_grad(model, x, y, self.loss_fn or ce_per_example, -1.0 if self.targeted else 1.0)
        return (x + self.eps * normalize(g, "linf")).clamp(0.0, 1.0)


class FGM(FGSM):
    """FGM (Miyato et al. 2017, eq. 7): one L2-normalised gradient step, x' = clip(x + ε·g/‖g‖₂)
    per example. Parameters as FGSM's; eps is an L2 budget (default 8/255: set your own)."""

    norm = "l2"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g, _ = _input_grad(model, x, y, self.loss_fn or ce_per_example, -1.0 if self.targeted else 1.0)
        return (x + self.eps * normalize(g, "l2")).clamp(0.0, 1.0)


class PGD(Attack):
    """PGD (Madry et al. 2018, eq. 2.1): a random start in B_ε(x), then `steps` steps of size
    `alpha` along sign(g) (L∞) or g/‖g‖₂ (L2), each projected onto B_ε(x) ∩ [0, 1]^m.

    eps (8/255), alpha (None: 2.5·ε/steps), steps (10), norm ("linf" or "l2"), random_start
    (True), restarts (1; per example the run that succeeds, ties: the larger loss), targeted
    (False: y is the target), loss_fn (None: per-example CE; else y is whatever it takes,
    [N, ...], e.g. TRADES' soft labels), eval_mode (True), check_range (True: check x ∈ [0, 1],
    the labels < K; a host sync each; False inside training steps)."""

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        restarts: int = 1,
        targeted: bool = False,
        loss_fn: LossFn | None = None,
        eval_mode: bool = True,
        check_range: bool = True,
    ):
        eps = check_positive("eps", eps)
        steps = check_int("steps", steps)
        restarts = check_int("restarts", restarts)
        check_norm(norm)
        alpha = check_positive("alpha", alpha, allow_none=True)
        self.eps, self.steps, self.norm, self.restarts = eps, steps, norm, restarts
        self.alpha = alpha if alpha is not None else 2.5 * eps / steps
        self.random_start, self.targeted, self.loss_fn, self.eval_mode = random_start, targeted, loss_fn, eval_mode
        self.check_range = check_range

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss_fn, sign = self.loss_fn or ce_per_example, -1.0 if self.targeted else 1.0
        delta = random_start(x, self.eps, self.norm) if self.random_start else torch.zeros_like(x)
        for _ in range(self.steps):
            g, _ = _input_grad(model, x + delta, y, loss_fn, sign)
            delta = clip_box(x, project(delta + self.alpha * normalize(g, self.norm), self.eps, self.norm))
        return x + delta

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.restarts == 1:
            return self._run(model, x, y)
        loss_fn, sign = self.loss_fn or ce_per_example, -1.0 if self.targeted else 1.0
        labels = is_label(y, x.shape[0])
        best = best_obj = best_succ = None
        for _ in range(self.restarts):
            x_adv = self._run(model, x, y)
            with torch.no_grad():
                logits = model(x_adv)
                obj = sign * loss_fn(logits, y).reshape(-1).expand(x.shape[0])
                succ = success(logits, y, self.targeted) if labels else torch.zeros_like(obj, dtype=torch.bool)
            if best is None:
                best, best_obj, best_succ = x_adv, obj, succ
                continue
            better = (succ & ~best_succ) | ((succ == best_succ) & (obj > best_obj))
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_obj, best_succ = torch.where(better, obj, best_obj), best_succ | succ
        return best


ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "fgm": FGM,
    "pgd": PGD,
    "apgd": APGD,
    "apgd-t": APGDT,
    "square": Square,
    "fab": FAB,
    "fab-t": FABT,
    "lbfgs": LBFGS,
    "cw": CarliniWagnerL2,
}


def make_attack(name: str, **kwargs: object) -> Attack:
    """Build a registered attack; an unknown name or parameter raises ValueError naming it."""
    return build_registered("attack", ATTACKS, name, kwargs)
