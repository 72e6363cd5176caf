"""DARTS search (Liu et al., ICLR 2019, Algorithm 1), first and second order.

Each step: (1) architecture update on a validation batch with the first-order gradient
grad_a L_val(w, a) or the one-step unrolled hypergradient of search/hypergrad.py;
(2) weight update on a training batch, by SGD (or, when given, an adversarial-training
strategy from robust/training.py: `strategy.step(model, x, y, optimizer)`).
Subclasses change only `arch_objective` (DSRNA) or the whole arch step (LeaSE).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from search_spaces import Supernet

from .base import Batch, Searcher, accuracy
from .hypergrad import assign_grads, first_order_arch_grad, unrolled_arch_grad


@contextmanager
def frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Parameters temporarily excluded from autograd (requires_grad restored afterwards)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def val_objective(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_val and the validation accuracy from the supernet's logits."""
    return F.cross_entropy(logits, y), {"val_acc": accuracy(logits, y).detach()}


def check_searchable(model: Any, searcher: str = "DartsSearcher") -> None:
    """Raise TypeError unless `model` is an nn.Module with arch_parameters() and weight_parameters()
    (a search_spaces.Supernet): what a searcher optimises, α and the weights apart; ValueError
    when either list is empty or they share a parameter."""
    missing = [m for m in ("arch_parameters", "weight_parameters") if not callable(getattr(model, m, None))]
    if isinstance(model, torch.nn.Module) and not missing:
        arch, weights = list(model.arch_parameters()), list(model.weight_parameters())
        shared = {id(p) for p in arch} & {id(p) for p in weights}
        if not arch or not weights or shared:
            what = "shares parameters between them" if shared else f"returns no {'α' if not arch else 'weights'}"
            raise ValueError(
                f"{searcher}: model's arch_parameters() and weight_parameters() must be two non-empty, disjoint "
                f"lists (the bilevel problem's two variables); {type(model).__name__} {what}"
            )
        return
    lacks = f"it has no {' or '.join(f'{m}()' for m in missing)}" if missing else "it is not an nn.Module"
    raise TypeError(
        f"{searcher}: model must be a search_spaces.Supernet or an nn.Module with arch_parameters() and "
        f"weight_parameters() (the architecture's and the network's parameters); got {type(model).__name__}, "
        f"and {lacks} (a fixed network is trained with distsearch.train.run_training, not searched)"
    )


class DartsSearcher(Searcher):
    """DARTS: per step one architecture update (Adam on α, first-order or unrolled hypergradient)
    and one weight update (SGD with momentum, cosine lr; or `weight_strategy`'s adversarial step).

    model: a search_spaces.Supernet, or any nn.Module with arch_parameters() and
        weight_parameters() (two disjoint lists of parameters; genotype() also needs derive()).
    epochs: the length of the cosine weight-lr schedule.
    order: "first" (grad_α L_val at w) or "second" (the one-step unrolled hypergradient,
        finite differences of radius fd_r, replaying the forward's ReLU/max-pool pattern
        when fd_replay).
    w_lr, w_lr_min, w_momentum, w_weight_decay, grad_clip: the weights' SGD and schedule.
    arch_lr, arch_betas, arch_weight_decay: the architecture's Adam.
    weight_strategy: a robust/training.py strategy for the weight step (None: plain SGD).
    Raises TypeError when `model` lacks arch_parameters()/weight_parameters() and ValueError
    for an unknown `order`.
    """

    def __init__(
        self,
        model: Supernet,
        *,
        epochs: int,
        order: str = "first",
        w_lr: float = 0.025,
        w_lr_min: float = 0.001,
        w_momentum: float = 0.9,
        w_weight_decay: float = 3e-4,
        grad_clip: float = 5.0,
        arch_lr: float = 3e-4,
        arch_betas: tuple[float, float] = (0.5, 0.999),
        arch_weight_decay: float = 1e-3,
        fd_r: float = 0.01,
        fd_replay: bool = True,
        weight_strategy: Any = None,
    ):
        check_searchable(model, type(self).__name__)
        if order not in ("first", "second"):
            raise ValueError(f"algorithm.order: {order!r} is not one of 'first', 'second'")
        self.model, self.order, self.grad_clip, self.fd_r = model, order, grad_clip, fd_r
        self.fd_replay = fd_replay  # False: plain differences, as the reference DARTS code (hypergrad.py)
        self.w_weight_decay = w_weight_decay
        self.weight_strategy = weight_strategy
        if weight_strategy is not None:  # an adversarial weight step clips as the plain one does
            weight_strategy.grad_clip = grad_clip
        self.w_optimizer = torch.optim.SGD(
            model.weight_parameters(), lr=w_lr, momentum=w_momentum, weight_decay=w_weight_decay, foreach=True
        )
        self.a_optimizer = torch.optim.Adam(
            model.arch_parameters(), lr=arch_lr, betas=arch_betas, weight_decay=arch_weight_decay, foreach=True
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_optimizer, epochs, eta_min=w_lr_min)

    # -- the architecture objective: L_val here; DSRNA subtracts gamma * R ------------------
    def arch_objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return val_objective(self.model(x), y)

    def arch_step(self, train_batch: Batch, val_batch: Batch) -> dict[str, torch.Tensor]:
        (xt, yt), (xv, yv) = train_batch, val_batch
        arch, weights = self.model.arch_parameters(), self.model.weight_parameters()
        metrics: dict[str, torch.Tensor] = {}

        def val_loss() -> torch.Tensor:
            loss, m = self.arch_objective(xv, yv)
            metrics.update(m)
            return loss

        self.a_optimizer.zero_grad(set_to_none=True)
        if self.order == "second":
            xi = self.w_optimizer.param_groups[0]["lr"]
            train_loss = lambda: F.cross_entropy(self.model(xt), yt)
            grads, lv = unrolled_arch_grad(
                arch, weights, train_loss, val_loss, xi, self.w_weight_decay, self.fd_r, self.fd_replay
            )
        else:
            grads, lv = first_order_arch_grad(arch, val_loss)
        # A non-finite objective (e.g. an exploding certified bound) must never reach alpha:
        # such a step's gradients are zeroed without a host sync (Adam's momentum still moves).
        ok = torch.stack([torch.isfinite(lv)] + [torch.isfinite(g).all() for g in grads]).all()
        assign_grads(arch, [torch.where(ok, g.nan_to_num(0.0, 0.0, 0.0), 0.0) for g in grads])
        self.a_optimizer.step()
        metrics["val_loss"] = lv
        metrics["arch_nonfinite"] = (~ok).float()
        return metrics

    def weight_step(self, train_batch: Batch) -> dict[str, torch.Tensor]:
        with frozen(self.model.arch_parameters()):  # no graph, no gradient, no kernels for alpha
            return self._weight_step(train_batch)

    def _weight_step(self, train_batch: Batch) -> dict[str, torch.Tensor]:
        x, y = train_batch
        self.w_optimizer.zero_grad(set_to_none=True)
        if self.weight_strategy is not None:
            out = self.weight_strategy.step(self.model, x, y, self.w_optimizer)
            return {f"train_{k}" if not k.startswith("train") else k: v for k, v in out.items()}
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.weight_parameters(), self.grad_clip, foreach=True)
        self.w_optimizer.step()
        return {"train_loss": loss.detach(), "train_acc": accuracy(logits, y).detach()}

    def step(self, train_batch: Batch, val_batch: Batch) -> dict[str, torch.Tensor]:
        metrics = self.arch_step(train_batch, val_batch)
        metrics.update(self.weight_step(train_batch))
        return metrics
