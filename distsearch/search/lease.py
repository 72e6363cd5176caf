"""LeaSE: learning by self-explanation (Hosseini & Xie, arXiv 2012.12899; ../shared/PAPERS.md).

Explainer: the supernet, architecture A (alphas) and weights E. Audience: a fixed
architecture (robust/models.py `build_model(name)`, or any nn.Module) with weights W.
    1. E*(A) = argmin_E L(E, A; D_tr_e)                                           (eq. 1)
    2. delta_i* = argmax_{||d||<=eps} l(f(x_i + d; E*), t_i) on audience training data (eq. 2)
    3. W*(Delta*) = argmin_W sum_i l(f(delta_i* (.) x_i; W), t_i)                    (eq. 3)
    4. min_A L(E*(A), A; D_val_e) + gamma * L(W*(Delta*(E*(A))); D_val_a)            (eq. 4)
One `step` = one stage-4 architecture update, then one SGD step each of stages 1 and 3.
Stage 3 trains on the explanations the hypergradient computed (delta at E' and the old A:
the very audience step the hypergradient modelled; one attack per step), or, with
`fresh_explanations`, on a second attack at the updated (E, A). Data: shared
(both learners see the whole batch) or disjoint (explainer: first half of every batch,
audience: second half). The audience is validated on clean validation images, as in eq. 4.

The stage-4 hypergradient, chained one-step unrolled approximations (as DARTS eq. 6-8):
    E' = E - xi_e (grad_E L_tr_e(E, A) + wd E)          (order 'second'; E' = E for 'first')
    delta = PGD(E', A)   (search/explain.py; the explainer in eval mode)
    W' = W - xi_w (grad_W L_tr_a(W, delta) + wd W)
    J(A) = L_val_e(E', A) + gamma L_val_a(W')
    dJ/dA = dL_val_e/dA + gamma (d delta/dA)^T u + (dE'/dA)^T [dL_val_e/dE' + gamma (d delta/dE')^T u]
    u = (dW'/d delta)^T grad_W' L_val_a = -xi_w grad^2_{delta,W} L_tr_a(W, delta) . grad_W' L_val_a
    (dE'/dA)^T v = -xi_e grad^2_{A,E} L_tr_e(E, A) . v
Which terms are approximated and how:
  * Both mixed second derivatives (grad^2_{delta,W} for the audience, grad^2_{A,E} for
    the explainer) are central finite differences, hypergrad.finite_diff_hvp (r = fd_r):
    error O(R^2), R = r / ||v||: w +- R v replay the ReLU masks and max-pool choices of the
    virtual step's forward at w (search_spaces/pattern.py), so no kink within R adds its
    O(1/R) term (an audience_model's torch nn.ReLU / nn.MaxPool2d modules are swapped for the
    pattern's; ReLUs it calls as F.relu stay plain differences).
    The explainer's two vectors share one difference.
  * (d delta / d(A, E'))^T u is a vector-Jacobian product through the attack built with
    create_graph: `first_order=False` differentiates all `attack_steps` unrolled PGD steps
    exactly (memory grows with the steps); `first_order=True` (cheaper, the default)
    treats the attack to first order: the iterate before the last step is held fixed and
    only the last step (one double backward through the explainer) is differentiated.
  * Through L-inf PGD the sign step has a straight-through derivative (explain.py);
    the clamps pass no gradient on pinned coordinates; the argmax target is constant.
  * As in hypergrad.py, the virtual steps ignore momentum and gradient clipping, and the
    'first' order drops the (dE'/dA) term entirely (E' = E).
The tests check this against exact autograd through the unrolled stages (float64).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces import Supernet
from search_spaces.pattern import Pattern, make_replayable

from ..robust.attack_base import eval_mode
from .base import Batch, accuracy
from .darts import DartsSearcher
from .explain import (
    NORMS,
    WEIGHTINGS,
    attack_metrics,
    attack_target,
    pgd_explanation,
    random_start,
    to_display,
    weight_input,
)
from .hypergrad import assign_grads, finite_diff_hvp, param_grads, restore, virtual_step

OBJECTIVES = ("prediction", "label")


class LeaseSearcher(DartsSearcher):
    def __init__(
        self,
        model: Supernet,
        *,
        epochs: int,
        in_channels: int,
        num_classes: int,
        image_size: int | None = None,
        order: str = "first",
        gamma: float = 1.0,
        audience: str = "small_cnn",
        objective: str = "prediction",
        weighting: str = "delta",
        eps: float = 8 / 255,
        attack_steps: int = 7,
        attack_step_size: float = 2 / 255,
        norm: str = "linf",
        first_order: bool = True,
        audience_lr: float = 0.025,
        disjoint_data: bool = False,
        fresh_explanations: bool = False,
        weight_strategy: Any = None,
        audience_model: nn.Module | None = None,
        **optim: Any,  # DartsSearcher's optimiser options (w_lr, w_momentum, ..., fd_r, fd_replay)
    ):
        super().__init__(model, epochs=epochs, order=order, weight_strategy=weight_strategy, **optim)
        for field, value, allowed in (
            ("objective", objective, OBJECTIVES),
            ("weighting", weighting, WEIGHTINGS),
            ("norm", norm, NORMS),
        ):
            if value not in allowed:
                raise ValueError(f"algorithm.{field}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        if attack_steps < 1 or eps < 0 or attack_step_size <= 0 or gamma < 0:
            raise ValueError("algorithm: needs attack_steps >= 1, eps >= 0, attack_step_size > 0, gamma >= 0")
        self.gamma, self.objective, self.weighting, self.norm = gamma, objective, weighting, norm
        self.eps, self.attack_steps, self.attack_step_size = eps, attack_steps, attack_step_size
        self.first_order, self.disjoint_data, self.fresh_explanations = first_order, disjoint_data, fresh_explanations
        self.last_explanation: tuple[torch.Tensor, torch.Tensor] | None = None
        if audience_model is None:
            from ..robust.models import build_model  # lazy: the model zoo is optional at import time

            if audience == "mlp" and image_size is None:
                raise ValueError("algorithm.audience: mlp needs the image size (LeaseSearcher's image_size)")
            audience_model = build_model(
                audience, in_channels=in_channels, num_classes=num_classes, image_size=image_size
            )
        make_replayable(audience_model)  # its ReLUs and max pools, for finite_diff_hvp's replay
        p = next(model.parameters())
        self.audience = audience_model.to(device=p.device, dtype=p.dtype).train()
        # the audience follows the explainer's SGD settings and cosine schedule, scaled to its lr
        w = self.w_optimizer.defaults
        self.aud_optimizer = torch.optim.SGD(
            self.audience.parameters(),
            lr=audience_lr,
            momentum=w["momentum"],
            weight_decay=w["weight_decay"],
            foreach=True,
        )
        self.aud_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.aud_optimizer, epochs, eta_min=audience_lr * self.scheduler.eta_min / w["lr"]
        )

    # -- data ------------------------------------------------------------------------------
    def split(self, batch: Batch) -> tuple[Batch, Batch]:
        """(explainer batch, audience batch): the same batch, or its two halves."""
        if not self.disjoint_data:
            return batch, batch
        x, y = batch
        h = x.shape[0] // 2
        return (x[:h], y[:h]), (x[h : 2 * h], y[h : 2 * h])

    # -- stage 2: explanations ---------------------------------------------------------------
    def _attack(self, x: torch.Tensor, y: torch.Tensor, differentiable_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta, the attacked class) at the explainer's current weights, in eval mode."""
        with eval_mode(self.model):
            target = attack_target(self.model, x, y, self.objective)
            delta0 = random_start(x, self.eps, self.norm)
            delta = pgd_explanation(
                self.model,
                x,
                target,
                eps=self.eps,
                steps=self.attack_steps,
                step_size=self.attack_step_size,
                norm=self.norm,
                delta0=delta0,
                differentiable_steps=differentiable_steps,
            )
        return delta, target

    def explain(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stage 2 at the current (E, A): delta (detached) and the attack's metrics."""
        delta, target = self._attack(x, y, 0)
        with eval_mode(self.model):
            return delta, attack_metrics(self.model, x, delta, target)

    def explanation_images(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x, delta and the audience's weighted input, each rescaled into [0, 1] for image grids.
        Changes no state: the random start draws from a forked RNG, the explainer runs in eval
        mode. Without labels the `label` objective attacks the explainer's prediction instead."""
        x = x.to(next(self.model.parameters()))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if y is None:
                with eval_mode(self.model):
                    y = attack_target(self.model, x, x, "prediction")
            delta, _ = self._attack(x, y.to(x.device), 0)
        weighted = weight_input(delta, x, self.weighting)
        return {
            "x": x.detach(),
            "delta": to_display(delta, signed=True),
            "weighted": to_display(weighted, signed=self.weighting == "delta"),
        }

    # -- stage 4: the architecture update ----------------------------------------------------------
    def _audience_term(
        self, xa: torch.Tensor, ya: torch.Tensor, xav: torch.Tensor, yav: torch.Tensor, explainer: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """(d L_val_a(W') / d explainer, metrics, delta) at the explainer's current (virtual) weights."""
        k = 1 if self.first_order else self.attack_steps
        delta_graph, target = self._attack(xa, ya, k)
        delta = delta_graph.detach().requires_grad_(True)
        with eval_mode(self.model):
            metrics = attack_metrics(self.model, xa, delta.detach(), target)
        aud = list(self.audience.parameters())
        xi_w = self.aud_optimizer.param_groups[0]["lr"]
        aud_train = lambda: F.cross_entropy(self.audience(weight_input(delta, xa, self.weighting)), ya)
        pattern = Pattern() if self.fd_replay else None  # the audience's choices at W, replayed at W +- R v
        backup = virtual_step(aud, aud_train, xi_w, self.w_weight_decay, pattern)
        logits = self.audience(xav)
        lva = F.cross_entropy(logits, yav)
        v_w = param_grads(lva, aud)
        restore(aud, backup)
        (hvp,) = finite_diff_hvp([delta], aud, aud_train, v_w, self.fd_r, pattern)
        u = -xi_w * hvp
        grads = param_grads(delta_graph, explainer, grad_outputs=u)
        metrics.update(audience_val_loss=lva.detach(), audience_val_acc=accuracy(logits, yav).detach())
        return grads, metrics, delta.detach()

    def hypergradient(self, train_batch: Batch, val_batch: Batch) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """d/dA [L_val_e(E', A) + gamma L_val_a(W')], approximated as the module docstring says."""
        grads, metrics, _ = self._hypergradient(train_batch, val_batch)
        return grads, metrics

    def _hypergradient(self, train_batch: Batch, val_batch: Batch) -> tuple[list, dict, torch.Tensor]:
        (xe, ye), (xa, ya) = self.split(train_batch)
        (xev, yev), (xav, yav) = self.split(val_batch)
        arch, weights = self.model.arch_parameters(), self.model.weight_parameters()
        train_loss = lambda: F.cross_entropy(self.model(xe), ye)
        xi_e = self.w_optimizer.param_groups[0]["lr"]
        second = self.order == "second"
        pattern = Pattern() if self.fd_replay else None  # the explainer's choices at E, replayed at E +- R v
        backup = virtual_step(weights, train_loss, xi_e, self.w_weight_decay, pattern) if second else None
        lv, metrics = self.arch_objective(xev, yev)
        g = param_grads(lv, arch + weights)
        h, m, delta = self._audience_term(xa, ya, xav, yav, arch + weights)
        metrics.update(m)
        metrics["val_loss"] = lv.detach()
        metrics["arch_objective"] = lv.detach() + self.gamma * m["audience_val_loss"]
        n = len(arch)
        grads = [ga + self.gamma * ha for ga, ha in zip(g[:n], h[:n])]
        if second:
            v = [ge + self.gamma * he for ge, he in zip(g[n:], h[n:])]
            restore(weights, backup)
            hv = finite_diff_hvp(arch, weights, train_loss, v, self.fd_r, pattern)
            grads = [ga - xi_e * hi for ga, hi in zip(grads, hv)]
        return grads, metrics, delta

    def arch_step(self, train_batch: Batch, val_batch: Batch) -> dict[str, torch.Tensor]:
        return self._arch_step(train_batch, val_batch)[0]

    def _arch_step(self, train_batch: Batch, val_batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self.a_optimizer.zero_grad(set_to_none=True)
        grads, metrics, delta = self._hypergradient(train_batch, val_batch)
        assign_grads(self.model.arch_parameters(), grads)
        self.a_optimizer.step()
        return metrics, delta

    # -- stages 1 and 3 -----------------------------------------------------------------------
    def audience_step(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """One SGD step of eq. 3 on the explanation-weighted inputs.

        Also `audience_clean_acc`: the audience's accuracy on the same images un-weighted, before
        the step (eval mode: no BN statistics move), beside `audience_train_acc` on the weighted
        ones. Their gap is the distribution shift between what the audience trains on (delta*x)
        and what eq. 4 validates it on (clean images). On MNIST-like data delta*x is <= 0 on the
        strokes (the box pins delta <= 0 where x = 1), so with `delta` weighting the audience can
        fit delta*x and still score at or below chance on clean images: the method, not a bug."""
        with torch.no_grad(), eval_mode(self.audience):
            clean_acc = accuracy(self.audience(x), y)
        self.aud_optimizer.zero_grad(set_to_none=True)
        logits = self.audience(weight_input(delta, x, self.weighting))
        loss = F.cross_entropy(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.audience.parameters()), self.grad_clip, foreach=True)
        self.aud_optimizer.step()
        return {
            "audience_train_loss": loss.detach(),
            "audience_train_acc": accuracy(logits, y).detach(),
            "audience_clean_acc": clean_acc,
        }

    def step(self, train_batch: Batch, val_batch: Batch) -> dict[str, torch.Tensor]:
        metrics, delta = self._arch_step(train_batch, val_batch)
        explainer_batch, (xa, ya) = self.split(train_batch)
        metrics.update(self.weight_step(explainer_batch))
        if self.fresh_explanations:  # a second attack, at the updated (E, A)
            delta, m = self.explain(xa, ya)
            metrics.update(m)
        self.last_explanation = (xa, delta)  # transient, for inspection only
        metrics.update(self.audience_step(xa, ya, delta))
        return metrics

    # -- schedules and state ---------------------------------------------------------------------
    def end_epoch(self) -> None:
        super().end_epoch()
        self.aud_scheduler.step()

    def learning_rates(self) -> dict[str, float]:
        return {**super().learning_rates(), "lr/audience": self.aud_optimizer.param_groups[0]["lr"]}

    def extra_state(self) -> dict[str, Any]:
        return {
            "audience": self.audience.state_dict(),
            "aud_optimizer": self.aud_optimizer.state_dict(),
            "aud_scheduler": self.aud_scheduler.state_dict(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.audience.load_state_dict(state["audience"])
        self.aud_optimizer.load_state_dict(state["aud_optimizer"])
        self.aud_scheduler.load_state_dict(state["aud_scheduler"])
