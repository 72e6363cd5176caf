"""FAB (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast adaptive
boundary attack", algorithm 1) in L∞ and L2, untargeted or targeted: FAB-T, AutoAttack's
standard member (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"). A minimum-norm attack that follows the decision
boundary through its linearisations, biased towards the original point.

Per example, from x_0 = x_orig (or a random start), C = [0, 1]^m, f = z_t − z_y:
    π_k = {z : f(x_k) + ∇f(x_k)·(z − x_k) = 0}, the boundary between y and t linearised at x_k;
        t the fixed target (FAB-T) or, untargeted, the class of the closest linearised boundary,
        argmin_{l≠y} |z_l − z_y| / ‖∇z_l − ∇z_y‖_q (q the dual norm: 1 for L∞, 2 for L2);
    δ_k = proj_p(x_k, π_k ∩ C) − x_k,   δ_o = proj_p(x_orig, π_k ∩ C) − x_orig;
    α = min(‖δ_k‖_p / (‖δ_k‖_p + ‖δ_o‖_p), α_max);
    x_{k+1} = clip_C((1 − α)(x_k + η δ_k) + α (x_orig + η δ_o));
    if x_{k+1} is misclassified: keep it when it is the closest to x_orig so far, then step back,
        x_{k+1} ← x_orig + β (x_{k+1} − x_orig).
α_max = 0.1, η = 1.05, β = 0.9, 100 steps (AutoAttack's defaults).
proj_p(z, π ∩ C), the paper's projection onto a hyperplane with box constraints: the δ of least
p-norm with w·(z + δ) + b = 0 and z + δ ∈ C. Each coordinate moves towards the hyperplane,
δ_i = s_i min(λ a_i, r_i) (L2: a_i = |w_i|, the clipped Euclidean step; L∞: a_i = 1, one common
step length), s_i its direction and r_i its room in the box; the residual it removes,
Σ |w_i| min(λ a_i, r_i), is nondecreasing and piecewise linear in λ, so sorting the kinks
r_i / a_i gives λ exactly, in O(m log m). Where the hyperplane misses the box, every coordinate
moves to its bound: the box point closest to the hyperplane.
Restarts: run r > 1 starts at a random point of the sphere of radius ρ/2 around x_orig (uniform
direction in L2, max-normalised uniform noise in L∞), clipped to the box, ρ the example's best
distance so far, at most ε (without ε and nothing found yet: 0.3 in L∞, 1.0 in L2, AutoAttack's
FAB radii).
FAB-T: one run (times `restarts`) per target among the `n_targets` classes other than y with the
largest clean logits (AutoAttack: 9, capped at K − 1: the choice APGD-T makes). Success is
untargeted (argmax ≠ y) for both forms.
ε: None: the minimum-norm attack; every run attacks every example classified right, and the
result is the closest misclassified point found, x itself where none was found (or where x is
misclassified already). Set: an example counts as broken once a point within ε is found; it then
leaves the run (its verdict cannot change, so that point is within ε but not necessarily the
closest), and later targets and restarts attack only the examples still standing. Where the
closest point found lies beyond ε, x is returned: rejected, as AutoAttack does (its projection onto
the ball would be a point FAB never checked).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .attack_base import Attack, check_int, check_norm, check_positive, top_targets

DEFAULT_RADIUS = {"linf": 0.3, "l2": 1.0}  # restart radius when no ε is given and nothing is found yet


def project_hyperplane_box(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """δ [N, m] of least p-norm with w·(z + δ) + b = 0 and z + δ ∈ [0, 1]^m, per row of the flat
    z, w [N, m] and b [N]; where the hyperplane misses the box, the δ that takes z + δ closest to it."""
    g = (w * z).sum(1) + b  # the residual at z, to be removed
    direction = -torch.sign(g)[:, None] * torch.sign(w)
    room = torch.where(direction > 0, 1 - z, z).clamp_min(0.0)
    rate = w.abs()
    speed = rate if norm == "l2" else torch.ones_like(rate)
    tiny = torch.finfo(z.dtype).tiny
    kink = torch.where(rate > 0, room / speed.clamp_min(tiny), torch.zeros_like(room))
    kink, order = kink.sort(1)
    rate_s, speed_s, room_s = (t.gather(1, order) for t in (rate, speed, room))
    saturated = (rate_s * room_s).cumsum(1)  # removed by the coordinates that hit their bound by kink_k
    per_lambda = rate_s * speed_s
    total = per_lambda.sum(1, keepdim=True)
    slope = total - per_lambda.cumsum(1)  # d(removed)/dλ beyond kink_k
    removed = saturated + kink * slope  # the residual removed at λ = kink_k: nondecreasing in k
    need = g.abs()[:, None]
    k = (removed < need).sum(1, keepdim=True)  # λ lies in [kink_{k−1}, kink_k]
    feasible = k < z.shape[1]
    before = (k - 1).clamp_min(0)
    sat_prev = torch.where(k > 0, saturated.gather(1, before), torch.zeros_like(need))
    slope_prev = torch.where(k > 0, slope.gather(1, before), total)
    lam = (need - sat_prev).clamp_min(0.0) / slope_prev.clamp_min(tiny)
    move = torch.where(feasible, torch.minimum(lam * speed, room), room)
    return direction * move


def lp_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row p-norm of a flat [N, m] tensor."""
    return t.abs().amax(1) if norm == "linf" else t.norm(dim=1)


class FAB(Attack):
    """FAB (Croce & Hein 2020, ICML, alg. 1): a minimum-norm attack stepping to the box-constrained
    projection onto the linearised decision boundary, biased towards x, with a backward step
    after each success.

    eps (None: the closest misclassified point found, x where none; set: a point beyond ε is
    rejected, x returned), norm ("linf" or "l2"), steps (100), restarts (1; later runs start at
    a random point at half the best distance), targeted (False; True is FAB-T), n_targets (9,
    FAB-T: the most likely other classes, capped at K − 1), alpha_max (0.1), eta (1.05, the
    overshoot), beta (0.9, the backward step), eval_mode (True), check_range (True: check
    x ∈ [0, 1], the labels < K; a host sync each). Success is untargeted (argmax ≠ y) in both forms."""

    def __init__(
        self,
        eps: float | None = None,
        norm: str = "linf",
        steps: int = 100,
        restarts: int = 1,
        targeted: bool = False,
        n_targets: int = 9,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        eval_mode: bool = True,
        check_range: bool = True,
    ):
        eps = check_positive("eps", eps, allow_none=True)
        check_norm(norm)
        steps = check_int("steps", steps)
        restarts = check_int("restarts", restarts)
        n_targets = check_int("n_targets", n_targets)
        if not isinstance(targeted, bool):
            raise ValueError(f"targeted: must be True or False, got {targeted!r}")
        number = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not number(alpha_max) or not 0 <= alpha_max <= 1:
            raise ValueError(f"alpha_max: must lie in [0, 1], got {alpha_max!r}")
        if not number(eta) or eta < 1:
            raise ValueError(f"eta: must be a finite number >= 1 (the overshoot), got {eta!r}")
        if not number(beta) or not 0 < beta <= 1:
            raise ValueError(f"beta: must lie in (0, 1], got {beta!r}")
        self.eps, self.norm, self.steps, self.restarts = eps, norm, steps, restarts
        self.targeted, self.n_targets, self.eval_mode = targeted, n_targets, eval_mode
        self.alpha_max, self.eta, self.beta, self.check_range = float(alpha_max), float(eta), float(beta), check_range

    def _linearise(
        self, model: nn.Module, xk: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, shape: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, ∇f) at the flat points xk: f = z_t − z_y, t the target or the closest linearised boundary."""
        xk = xk.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xk.view(-1, *shape[1:]))
            z_y = logits.gather(1, y[:, None]).squeeze(1)
            if t is not None:  # FAB-T: one backward pass
                f = logits.gather(1, t[:, None]).squeeze(1) - z_y
                return f.detach(), torch.autograd.grad(f.sum(), xk)[0]
            k = logits.shape[1]  # untargeted: the whole Jacobian, one backward pass per class
            jac = torch.stack(
                [torch.autograd.grad(logits[:, c].sum(), xk, retain_graph=c < k - 1)[0] for c in range(k)], 1
            )
        rows = torch.arange(len(y), device=y.device)
        f_all = (logits - z_y[:, None]).detach()
        w_all = jac - jac[rows, y][:, None]
        dual = w_all.abs().sum(2) if self.norm == "linf" else w_all.norm(dim=2)
        dist = f_all.abs() / (dual + 1e-12)  # to each linearised boundary
        dist[rows, y] = math.inf
        closest = dist.argmin(1)
        return f_all[rows, closest], w_all[rows, closest]

    def _run(
        self,
        model: nn.Module,
        xo: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor | None,
        xk: torch.Tensor,
        shape: torch.Size,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One run from the flat start xk: (closest misclassified point, its p-distance; inf where none)."""
        best, best_d = xo.clone(), torch.full((xo.shape[0],), math.inf, device=xo.device, dtype=xo.dtype)
        act = torch.arange(xo.shape[0], device=xo.device)  # with ε: the examples not yet broken within it
        for _ in range(self.steps):
            xa, xoa = xk[act], xo[act]
            f, w = self._linearise(model, xa, y[act], None if t is None else t[act], shape)
            b = f - (w * xa).sum(1)  # π: w·z + b = 0
            dk, do = project_hyperplane_box(xa, w, b, self.norm), project_hyperplane_box(xoa, w, b, self.norm)
            nk, no = lp_norm(dk, self.norm), lp_norm(do, self.norm)
            alpha = (nk / (nk + no).clamp_min(1e-12)).clamp(max=self.alpha_max)[:, None]
            x_new = ((1 - alpha) * (xa + self.eta * dk) + alpha * (xoa + self.eta * do)).clamp(0.0, 1.0)
            with torch.no_grad():
                fooled = model(x_new.view(-1, *shape[1:])).argmax(1) != y[act]
            d = lp_norm(x_new - xoa, self.norm)
            closer = fooled & (d < best_d[act])
            best[act[closer]], best_d[act[closer]] = x_new[closer], d[closer]
            xk[act] = torch.where(fooled[:, None], xoa + self.beta * (x_new - xoa), x_new)  # the backward step
            if self.eps is not None:
                act = act[best_d[act] > self.eps]
                if act.numel() == 0:
                    break
        return best, best_d

    def _random_start(self, xo: torch.Tensor, best_d: torch.Tensor) -> torch.Tensor:
        cap = self.eps if self.eps is not None else DEFAULT_RADIUS[self.norm]
        radius = best_d.clamp(max=cap)[:, None] / 2
        if self.norm == "linf":
            u = torch.rand_like(xo) * 2 - 1
            u = u / u.abs().amax(1, keepdim=True).clamp_min(1e-12)
        else:
            u = torch.randn_like(xo)
            u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (xo + radius * u).clamp(0.0, 1.0)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(x)
        k = logits.shape[1]
        if k < 2:
            raise ValueError(f"model: FAB needs at least 2 classes, the model has {k}")
        flat = x.flatten(1)
        out = flat.clone()
        right = logits.argmax(1) == y
        best_d = torch.where(right, math.inf, 0.0).to(flat.dtype)  # x misclassified: distance 0
        targets = top_targets(logits, y, min(self.n_targets, k - 1)) if self.targeted else None
        for j in range(1 if targets is None else targets.shape[1]):
            for r in range(self.restarts):
                todo = right if self.eps is None else right & (best_d > self.eps)
                idx = todo.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                xo = flat[idx]
                start = xo.clone() if r == 0 else self._random_start(xo, best_d[idx])
                t = None if targets is None else targets[idx, j]
                point, d = self._run(model, xo, y[idx], t, start, x.shape)
                closer = d < best_d[idx]
                out[idx[closer]], best_d[idx[closer]] = point[closer], d[closer]
        if self.eps is not None:  # beyond ε: rejected
            out = torch.where((best_d > self.eps)[:, None], flat, out)
        return out.view(x.shape)


class FABT(FAB):
    """FAB-T (AutoAttack's targeted FAB, Croce & Hein 2020): FAB towards a fixed target, once per
    target among the `n_targets` (9, capped at K − 1) most likely other classes; with eps, each
    target runs on the examples no earlier one broke within ε. Same as FAB(targeted=True);
    other parameters and defaults as FAB's."""

    def __init__(
        self,
        eps: float | None = None,
        norm: str = "linf",
        steps: int = 100,
        n_targets: int = 9,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        eval_mode: bool = True,
        check_range: bool = True,
    ):
        super().__init__(eps, norm, steps, restarts, True, n_targets, alpha_max, eta, beta, eval_mode, check_range)
