"""Adversarial-training strategies, one interface: `strategy.step(model, x, y, optimizer) -> metrics`.

Single-shot and multi-step strategies here; the amortised ones (FreeAT, YOPO, FreeLB) are in
training_amortized.py; the interface and pass counting in training_base.py. Defaults are
CIFAR's (ε = 8/255); pass eps for other data. Images in [0, 1]; every x + δ is kept in the box.
- standard: L(f(x), y).
- fgsm (Goodfellow et al. 2015, eq. 6): α·L(x) + (1−α)·L(x + ε·sign ∇_x L(x)), α = 0.5; the
  clean pass gives ∇_θ L(x) and ∇_x L(x) from one backward.
- fgm (Miyato et al. 2017, eq. 7-8): L(x) + λ·L(x + ε·g/‖g‖₂), λ = 1, the same two passes.
- fgsm_rs / Fast-AT (Wong et al. 2020, Alg. 3): δ ~ U(−ε, ε), δ ← Π(δ + a·sign ∇_δ L), a = 1.25ε.
- pgd (Madry et al. 2018, eq. 2.1): PGD-k with random start crafted in the model's own
  (training) mode, a = ε/4 (2/255 at 8/255), k = 7, then L(f(x'), y).
- trades (Zhang et al. 2019, eq. 5): L(f(x), y) + β·KL(f(x) ‖ f(x')), x' by PGD on the KL,
  crafted in eval mode, β = 6, 10 steps of ε/4. Choice: PGD's uniform random start instead
  of TRADES' 0.001·N(0, I).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .attack_base import attack_context, check_int, check_norm, check_positive, clip_box, normalize, project
from .attacks import PGD
from .registry import build_registered
from .training_amortized import Free, FreeLB, Yopo
from .training_base import (
    PassCounter,
    Strategy,
    accumulate,
    accuracy,
    check_model,
    cross_entropy,
    fit,
    optimizer_params,
)

__all__ = ["STRATEGIES", "Strategy", "check_model", "fit", "make_strategy"]


class Standard(Strategy):
    name = "standard"

    def _step(self, model, x, y, optimizer, counter: PassCounter) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = cross_entropy(logits, y)
        out = {"loss": loss, "acc": accuracy(logits, y)}
        aux = getattr(model, "aux_logits", None) if self.aux_weight else None
        if aux is not None:  # DARTS retraining: L + w·L_aux, the auxiliary head's logits of this forward
            out["aux_loss"] = cross_entropy(aux, y)
            loss = loss + self.aux_weight * out["aux_loss"]
        accumulate(loss, optimizer_params(optimizer))
        self.update(optimizer)
        return out


class FGSMTraining(Strategy):
    """w_clean·L(x) + w_adv·L(x + ε·s(∇_x L(x))), s = sign (fgsm) or L2-normalise (fgm)."""

    name, norm = "fgsm", "linf"

    def __init__(self, eps: float = 8 / 255, alpha: float = 0.5):
        eps = check_positive("eps", eps)
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha: the clean-loss weight must be in [0, 1), got {alpha!r}")
        self.eps, self.alpha = eps, alpha
        self.weights = (alpha, 1.0 - alpha)

    def _step(self, model, x, y, optimizer, counter: PassCounter) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        params = optimizer_params(optimizer)
        xg = x.detach().requires_grad_(True)
        loss_clean = cross_entropy(model(xg), y)
        (gx,) = accumulate(loss_clean, params, [xg], scale=self.weights[0])
        x_adv = (x + self.eps * normalize(gx, self.norm)).clamp(0.0, 1.0).detach()
        logits = model(x_adv)
        loss_adv = cross_entropy(logits, y)
        accumulate(loss_adv, params, scale=self.weights[1])
        self.update(optimizer)
        return {"loss": self.weights[0] * loss_clean + self.weights[1] * loss_adv, "acc": accuracy(logits, y)}


class FGMTraining(FGSMTraining):
    name, norm = "fgm", "l2"

    def __init__(self, eps: float = 1.0, adv_weight: float = 1.0):
        eps = check_positive("eps", eps)
        adv_weight = check_positive("adv_weight", adv_weight)
        self.eps, self.adv_weight = eps, adv_weight
        self.weights = (1.0, adv_weight)


class FastAT(Strategy):
    name = "fgsm_rs"

    def __init__(self, eps: float = 8 / 255, alpha: float | None = None):
        eps = check_positive("eps", eps)
        alpha = check_positive("alpha", alpha, allow_none=True)
        self.eps, self.alpha = eps, alpha if alpha is not None else 1.25 * eps

    def _step(self, model, x, y, optimizer, counter: PassCounter) -> dict[str, torch.Tensor]:
        delta = clip_box(x, torch.empty_like(x).uniform_(-self.eps, self.eps)).requires_grad_(True)
        (g,) = torch.autograd.grad(cross_entropy(model(x + delta), y), delta)
        delta = clip_box(x, project(delta.detach() + self.alpha * g.sign(), self.eps, "linf"))
        optimizer.zero_grad(set_to_none=True)
        logits = model(x + delta)
        loss = cross_entropy(logits, y)
        accumulate(loss, optimizer_params(optimizer))
        self.update(optimizer)
        return {"loss": loss, "acc": accuracy(logits, y)}


class PGDTraining(Strategy):
    name = "pgd"

    def __init__(self, eps: float = 8 / 255, alpha: float | None = None, steps: int = 7, norm: str = "linf"):
        eps = check_positive("eps", eps)
        steps = check_int("steps", steps)
        check_norm(norm)
        alpha = check_positive("alpha", alpha, allow_none=True)
        self.eps, self.steps, self.norm = eps, steps, norm
        self.alpha = alpha if alpha is not None else eps / 4
        # check_range=False: the range check would wait for the device every step (tests/test_no_host_sync.py)
        self._attack = PGD(eps, self.alpha, steps, norm, random_start=True, eval_mode=False, check_range=False)

    def _step(self, model, x, y, optimizer, counter: PassCounter) -> dict[str, torch.Tensor]:
        x_adv = self._attack(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        logits = model(x_adv)
        loss = cross_entropy(logits, y)
        accumulate(loss, optimizer_params(optimizer))
        self.update(optimizer)
        return {"loss": loss, "acc": accuracy(logits, y)}


def kl_per_example(logits_adv: torch.Tensor, p_nat: torch.Tensor) -> torch.Tensor:
    """KL(p_nat ‖ softmax(logits_adv)) per example."""
    return (p_nat * (p_nat.clamp_min(1e-12).log() - F.log_softmax(logits_adv, dim=1))).sum(1)


class Trades(Strategy):
    name = "trades"

    def __init__(self, eps: float = 8 / 255, beta: float = 6.0, steps: int = 10, alpha: float | None = None):
        eps = check_positive("eps", eps)
        beta = check_positive("beta", beta)
        steps = check_int("steps", steps)
        alpha = check_positive("alpha", alpha, allow_none=True)
        self.eps, self.beta, self.steps = eps, beta, steps
        self.alpha = alpha if alpha is not None else eps / 4
        self._attack = PGD(eps, self.alpha, steps, "linf", random_start=True, loss_fn=kl_per_example, check_range=False)

    def _step(self, model, x, y, optimizer, counter: PassCounter) -> dict[str, torch.Tensor]:
        with attack_context(model), torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)
        x_adv = self._attack(model, x, p_nat)
        optimizer.zero_grad(set_to_none=True)
        logits_nat, logits_adv = model(x), model(x_adv)
        robust = kl_per_example(logits_adv, F.softmax(logits_nat, dim=1)).mean()
        loss = cross_entropy(logits_nat, y) + self.beta * robust
        accumulate(loss, optimizer_params(optimizer))
        self.update(optimizer)
        return {"loss": loss, "acc": accuracy(logits_adv, y), "clean_acc": accuracy(logits_nat, y)}


STRATEGIES: dict[str, type[Strategy]] = {
    "standard": Standard,
    "fgsm": FGSMTraining,
    "fgsm_rs": FastAT,
    "fgm": FGMTraining,
    "pgd": PGDTraining,
    "free": Free,
    "yopo": Yopo,
    "freelb": FreeLB,
    "trades": Trades,
}


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a registered strategy; an unknown name or parameter raises ValueError naming it."""
    return build_registered("strategy", STRATEGIES, name, kwargs)
