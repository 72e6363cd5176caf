"""Minimum-distortion attacks: Szegedy's box-constrained L-BFGS and Carlini–Wagner L2.

- Szegedy et al. 2014, section 4.1: minimise c·‖r‖ + loss_f(x + r, l) subject to
  x + r ∈ [0,1]^m, for a target l ≠ f(x), solved with SciPy's L-BFGS-B (bounds [0, 1] on
  x + r); a line search on c keeps, per example, the smallest distortion that reaches l.
  Choices (documented, not in the paper): the penalty is the squared norm c·‖r‖₂² (smooth at
  r = 0); the search on c is a bisection in the direction "larger c, smaller r": success
  raises c (×10 until a failure brackets it), failure halves towards the last success.
  Untargeted use targets the runner-up class of f(x).
- Carlini & Wagner 2017, section V.A (L2): x' = (tanh(w) + 1)/2, minimise
  ‖x' − x‖₂² + c·g(x') with g = max(Z_y − max_{i≠y} Z_i, −κ) (untargeted) or
  max(max_{i≠t} Z_i − Z_t, −κ) (targeted t), Adam on w, binary search on c. Choice: lr 0.1
  and 100 steps by default (the paper's lr 0.01 needs thousands of steps).
Both return, per example, the least-distorted successful x' found, or x itself where none
succeeded; with `eps` set the result is projected onto the L2 ball of radius ε.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attack_base import Attack, check_int, check_positive, clip_box, l2_norm, project, runner_up, success


class _MinDistortion(Attack):
    """Shared search on the constant c. L-BFGS's c weighs the distortion (success: raise c);
    C&W's c weighs the attack loss (success: lower c). Unbracketed, c moves ×10 or ÷2."""

    c_weighs_distortion = True
    norm = "l2"

    def __init__(self, targeted: bool, c_init: float, search_steps: int, eps: float | None, check_range: bool):
        c_init = check_positive("c_init", c_init)
        search_steps = check_int("search_steps", search_steps)
        eps = check_positive("eps", eps, allow_none=True)
        self.targeted, self.c_init, self.search_steps, self.eps = targeted, c_init, search_steps, eps
        self.check_range = check_range

    def solve(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Candidates x' for penalty constants c (one per example)."""
        raise NotImplementedError

    def succeeded(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per example: whether logits count as a success (untargeted: any misclassification)."""
        return success(logits, y, self.targeted)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 0:  # nothing to attack (L-BFGS would concatenate no solutions)
            return x.clone()
        c = torch.full((n,), float(self.c_init), device=x.device)
        lo, hi = torch.zeros_like(c), torch.full_like(c, float("inf"))
        best, best_d = x.clone(), torch.full_like(c, float("inf"))
        for _ in range(self.search_steps):
            cand = self.solve(model, x, y, c)
            with torch.no_grad():
                ok = self.succeeded(model(cand), y)
                d = l2_norm(cand - x)
            better = ok & (d < best_d)
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_d = torch.where(better, d, best_d)
            up = ok if self.c_weighs_distortion else ~ok  # raise c next?
            lo, hi = torch.where(up, c, lo), torch.where(up, hi, c)
            c = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)
        if self.eps is not None:
            best = x + clip_box(x, project(best - x, self.eps, "l2"))
        return best


class LBFGS(_MinDistortion):
    """Box-constrained L-BFGS (Szegedy et al. 2014, §4.1): min c·‖r‖₂² + CE(f(x + r), l) over
    x + r ∈ [0, 1]^m with SciPy's L-BFGS-B, one problem per example, and a search on c keeping
    the least-distorted success.

    targeted (False: l is the runner-up class; True: l = y), c_init (0.1), search_steps (6),
    max_iter (50 L-BFGS iterations), eps (None; set: the result projected onto the L2 ε-ball),
    check_range (True: check x ∈ [0, 1], the labels < K; a host sync each)."""

    def __init__(
        self,
        targeted: bool = False,
        c_init: float = 0.1,
        search_steps: int = 6,
        max_iter: int = 50,
        eps: float | None = None,
        check_range: bool = True,
    ):
        super().__init__(targeted, c_init, search_steps, eps, check_range)
        max_iter = check_int("max_iter", max_iter)
        self.max_iter = max_iter

    def solve(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """One L-BFGS-B problem per example (SciPy's cost grows faster than linearly in the size)."""
        with torch.no_grad():
            t = y if self.targeted else runner_up(model(x), y)
        return torch.cat([self._solve_one(model, x[i : i + 1], t[i : i + 1], float(c[i])) for i in range(len(x))])

    def _solve_one(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, c: float) -> torch.Tensor:
        from scipy.optimize import Bounds, minimize  # here: SciPy costs every other import 0.3 s

        def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
            xa = torch.from_numpy(v).view(x.shape).to(x).requires_grad_(True)
            loss = c * ((xa - x) ** 2).sum() + F.cross_entropy(model(xa), t)
            (g,) = torch.autograd.grad(loss, xa)
            return float(loss.detach()), g.detach().cpu().double().numpy().ravel()

        x0 = x.detach().cpu().double().numpy().ravel()
        res = minimize(
            fun, x0, jac=True, method="L-BFGS-B", bounds=Bounds(0.0, 1.0), options={"maxiter": self.max_iter}
        )
        return torch.from_numpy(np.clip(res.x, 0.0, 1.0)).view(x.shape).to(x)


class CarliniWagnerL2(_MinDistortion):
    """Carlini–Wagner L2 (Carlini & Wagner 2017, §V.A): x' = (tanh(w) + 1)/2, Adam on
    ‖x' − x‖₂² + c·max(margin, −κ), a binary search on c keeping the least-distorted success.

    targeted (False: any misclassification; True: reach y), c_init (1.0), search_steps (5),
    steps (100 Adam steps), lr (0.1; the paper's 0.01 needs thousands of steps), kappa (0, the
    confidence: as in the paper's code, a point counts as a success only when the wrong class
    (or the target) leads by at least κ), eps (None; set: the result projected onto the L2
    ε-ball), check_range (True: check x ∈ [0, 1], the labels < K; a host sync each)."""

    c_weighs_distortion = False

    def __init__(
        self,
        targeted: bool = False,
        c_init: float = 1.0,
        search_steps: int = 5,
        steps: int = 100,
        lr: float = 0.1,
        kappa: float = 0.0,
        eps: float | None = None,
        check_range: bool = True,
    ):
        super().__init__(targeted, c_init, search_steps, eps, check_range)
        steps = check_int("steps", steps)
        lr = check_positive("lr", lr)
        if not isinstance(kappa, numbers.Real) or isinstance(kappa, bool) or not kappa >= 0:
            raise ValueError(f"kappa: must be a number >= 0, got {kappa!r}")
        self.steps, self.lr, self.kappa = steps, lr, float(kappa)
        self.squash = 1 - 1e-6

    def solve(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        w = torch.atanh((2 * x - 1) * self.squash).detach().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.lr)
        best, best_d = x.clone(), torch.full_like(c, float("inf"))
        for _ in range(self.steps):
            xa = (torch.tanh(w) + 1) / 2
            logits = model(xa)
            dist = ((xa - x) ** 2).flatten(1).sum(1)
            loss = (dist + c * self._margin(logits, y).clamp(min=-self.kappa)).sum()
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                ok = self.succeeded(logits, y) & (dist < best_d)
                best = torch.where(ok.view(-1, *([1] * (x.dim() - 1))), xa, best)
                best_d = torch.where(ok, dist, best_d)
            opt.step()
        # where no iterate succeeded, hand back the last one so the caller sees the failure
        with torch.no_grad():
            last = (torch.tanh(w) + 1) / 2
        return torch.where(torch.isinf(best_d).view(-1, *([1] * (x.dim() - 1))), last, best).detach()

    def _margin(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Z_y − max_{i≠y} Z_i (untargeted), max_{i≠t} Z_i − Z_t (targeted t = y): ≤ −κ is a success."""
        onehot = F.one_hot(y, num_classes=logits.shape[1]).bool()
        real = logits.masked_fill(~onehot, float("-inf")).amax(1)
        other = logits.masked_fill(onehot, float("-inf")).amax(1)
        return other - real if self.targeted else real - other

    def succeeded(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ok = success(logits, y, self.targeted)
        return ok & (self._margin(logits, y) <= -self.kappa) if self.kappa > 0 else ok
