"""APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", algorithm 1): PGD with momentum whose step size
needs no tuning, the main attack of AutoAttack; with the cross-entropy, the DLR or the
targeted DLR loss (APGD-T).

Per example, with P the projection onto B_ε(x) ∩ [0, 1]^m and s(g) = sign(g) (L∞) or
g/‖g‖₂ (L2):
    x1 = P(x0 + η s(∇f(x0))),  η = 2ε,  x0 a random start
    z_{k+1} = P(x_k + η_k s(∇f(x_k)))
    x_{k+1} = P(x_k + α (z_{k+1} − x_k) + (1 − α)(x_k − x_{k−1})),  α = 0.75.
At the checkpoints w_j = ⌈p_j N⌉ (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03,
0.06)) the step halves and the iterate restarts from the best point so far when
    (1) fewer than ρ (w_j − w_{j−1}) of the steps since w_{j−1} increased f (ρ = 0.75), or
    (2) the step was not halved at w_{j−1} and the best objective has not moved since.
DLR (eq. 6): −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3), π the logits sorted decreasingly:
invariant to shifting and scaling the logits, so it does not vanish on saturated softmaxes
as cross-entropy's gradient can.
APGD-T (AutoAttack's targeted run): the paper's targeted DLR
    −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2)   (at least 4 classes),
maximised once for each target t among the `n_targets` classes other than y with the largest
clean logits (AutoAttack: 9, capped at K − 1), each run with the full `steps` and `restarts`;
success stays untargeted (argmax ≠ y). Each run attacks only the examples no earlier target
broke, so an example keeps the point of the first target that succeeded (else the first run's
point of highest loss).
Returned: per example, the first point found misclassified, else the one of highest f. After
a restart the momentum starts again from the best point (x_{k−1} = x_k): a choice the paper
leaves open. Restarts (`restarts` > 1) keep each example's successful run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attack_base import (
    Attack,
    ce_per_example,
    check_int,
    check_norm,
    check_positive,
    clip_box,
    normalize,
    project,
    top_targets,
)
from .attack_base import random_start as ball_start

LOSSES = ("ce", "dlr", "dlr-t")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example difference-of-logits ratio (needs at least 3 classes)."""
    if logits.shape[1] < 3:
        raise ValueError(f"loss: dlr needs at least 3 classes, the model has {logits.shape[1]}; use loss ce")
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-example targeted DLR towards class t (needs at least 4 classes)."""
    if logits.shape[1] < 4:
        raise ValueError(f"loss: dlr-t needs at least 4 classes, the model has {logits.shape[1]}; use loss ce or dlr")
    top = logits.topk(4, dim=1).values
    z_y, z_t = logits.gather(1, y[:, None]).squeeze(1), logits.gather(1, t[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j (0 < w_j < steps) at which APGD may halve its step."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    w = {math.ceil(round(q * steps, 9)) for q in p[1:]}  # round: 0.57 * 100 is 57.00000000000001 in floats
    return sorted(k for k in w if 0 < k < steps)


class APGD(Attack):
    """APGD (Croce & Hein 2020, alg. 1): PGD with momentum and a step size, 2ε at first, halved
    at checkpoints where progress stalls, restarting from the best point; AutoAttack's main attack.

    eps (8/255), steps (100, at least 2), norm ("linf" or "l2"), loss ("ce", "dlr", or "dlr-t":
    APGD-T), restarts (1; keep each example's successful run), rho (0.75, the checkpoint test),
    momentum (0.75), eval_mode (True), n_targets (9, dlr-t only: targets per example, capped at
    K − 1), check_range (True: check x ∈ [0, 1], the labels < K; a host sync each). Returns per example the first
    misclassified point found, else the point of highest loss."""

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 100,
        norm: str = "linf",
        loss: str = "ce",
        restarts: int = 1,
        rho: float = 0.75,
        momentum: float = 0.75,
        eval_mode: bool = True,
        n_targets: int = 9,
        check_range: bool = True,
    ):
        eps = check_positive("eps", eps)
        steps = check_int("steps", steps, minimum=2)
        restarts = check_int("restarts", restarts)
        n_targets = check_int("n_targets", n_targets)
        check_norm(norm)
        if loss not in LOSSES:
            raise ValueError(f"loss: must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not 0 < rho <= 1 or not 0 < momentum <= 1:
            raise ValueError(f"rho, momentum: must lie in (0, 1], got {rho!r}, {momentum!r}")
        self.eps, self.steps, self.norm, self.loss, self.restarts = eps, steps, norm, loss, restarts
        self.rho, self.momentum, self.eval_mode, self.n_targets = rho, momentum, eval_mode, n_targets
        self.check_range = check_range

    def _objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, grad: bool = True):
        """(∇f or None, f per example, misclassified) at x; t: the targets of dlr-t."""
        x = x.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            logits = model(x)
            if self.loss == "dlr-t":
                f = dlr_targeted_loss(logits, y, t)
            else:
                f = (dlr_loss if self.loss == "dlr" else ce_per_example)(logits, y)
        g = torch.autograd.grad(f.sum(), x)[0] if grad else None
        return g, f.detach(), (logits.argmax(1) != y).detach()

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, misclassified) of one run from a random start."""
        rows = lambda m: m.view((-1,) + (1,) * (x.dim() - 1))  # noqa: E731
        proj = lambda t: x + clip_box(x, project(t - x, self.eps, self.norm))  # noqa: E731
        step = lambda t, eta, g: proj(t + rows(eta) * normalize(g, self.norm))  # noqa: E731
        eta = torch.full((x.shape[0],), 2.0 * self.eps, device=x.device, dtype=x.dtype)
        x_prev = x + ball_start(x, self.eps, self.norm)
        g, f_prev, found = self._objective(model, x_prev, y, t)
        x_max, f_max, g_max, adv = x_prev, f_prev, g, x_prev.clone()
        x_k = step(x_prev, eta, g)
        marks = set(checkpoints(self.steps))
        last_mark, increases = 0, torch.zeros_like(f_prev)
        f_max_at_mark, halved_at_mark = f_max.clone(), torch.zeros_like(found)  # w_0 = 0: not halved
        for k in range(1, self.steps + 1):
            g, f, fooled = self._objective(model, x_k, y, t, grad=k < self.steps)
            new = fooled & ~found
            adv[new], found = x_k[new], found | fooled
            better = f > f_max
            x_max, f_max = torch.where(rows(better), x_k, x_max), torch.where(better, f, f_max)
            if k == self.steps:
                break
            g_max = torch.where(rows(better), g, g_max)
            increases += (f > f_prev).to(f.dtype)
            f_prev = f
            if k in marks:
                halve = (increases < self.rho * (k - last_mark)) | (~halved_at_mark & (f_max <= f_max_at_mark))
                eta = torch.where(halve, eta / 2, eta)
                # restart from the best point, the momentum from zero
                x_k, x_prev, g = (
                    torch.where(rows(halve), b, a) for a, b in ((x_k, x_max), (x_prev, x_max), (g, g_max))
                )
                f_prev = torch.where(halve, f_max, f)
                last_mark, increases = k, torch.zeros_like(increases)
                f_max_at_mark, halved_at_mark = f_max.clone(), halve
            z = step(x_k, eta, g)
            x_prev, x_k = x_k, proj(x_k + self.momentum * (z - x_k) + (1 - self.momentum) * (x_k - x_prev))
        return torch.where(rows(found), adv, x_max), found

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss == "dlr-t":
            return self._perturb_targeted(model, x, y)
        best, found = self._run(model, x, y)
        for _ in range(self.restarts - 1):
            x_adv, fooled = self._run(model, x, y)
            take = (fooled & ~found).view((-1,) + (1,) * (x.dim() - 1))
            best, found = torch.where(take, x_adv, best), found | fooled
        return best

    def _perturb_targeted(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """APGD-T: one run (times `restarts`) per target, on the examples not broken yet."""
        with torch.no_grad():
            logits = model(x)
        if logits.shape[1] < 4:
            dlr_targeted_loss(logits, y, y)  # raises the error that names the loss
        k = min(self.n_targets, logits.shape[1] - 1)
        targets = top_targets(logits, y, k)  # by clean logit
        best, found = x.clone(), torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        first = True
        for j in range(k):
            for _ in range(self.restarts):
                todo = (~found).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return best
                x_adv, fooled = self._run(model, x[todo], y[todo], targets[todo, j])
                keep = torch.ones_like(fooled) if first else fooled
                best[todo[keep]], found[todo[fooled]], first = x_adv[keep], True, False
        return best


class APGDT(APGD):
    """APGD-T (AutoAttack's targeted APGD, Croce & Hein 2020): APGD on the targeted DLR loss
    −(z_y − z_t)/(z_π1 − (z_π3 + z_π4)/2), one full run per target t among the `n_targets` (9,
    capped at K − 1) most likely other classes, each on the examples no earlier target broke;
    success is untargeted; needs K ≥ 4. Other parameters and defaults as APGD's."""

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 100,
        norm: str = "linf",
        n_targets: int = 9,
        restarts: int = 1,
        rho: float = 0.75,
        momentum: float = 0.75,
        eval_mode: bool = True,
        check_range: bool = True,
    ):
        super().__init__(eps, steps, norm, "dlr-t", restarts, rho, momentum, eval_mode, n_targets, check_range)
