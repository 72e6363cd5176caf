"""DSRNA: differentiable search of robust neural architectures (Hosseini, Yang, Xie, CVPR 2021,
eq. 1):  min_a L_val(w*(a), a) - gamma * R(w*(a), a),  w*(a) = argmin_w L_tr(w, a),
with w*(a) by the DARTS one-step approximation (first or second order, inherited from
DartsSearcher: only `arch_objective` changes). Variants of the robustness metric R:
- "jacobian":  R_jac = -(eps / K) sum_k ||J_k(x)||_q          (robust/jacobian.py; by double
               backward, or with `jacobian_fd_step` > 0 by finite differences along the dual
               directions: the same gradients without a second-order graph)
- "certified": R_cb = mean_x s(min_{j != y} lower(f_y - f_j)) at eps (robust/bounds.py, IBP or
               CROWN-IBP linear bounds), differentiable in alpha through the mixed ops; s is
               symlog(m) = sign(m) log(1 + |m|) by default (`cb_scale`), identity with 'linear'
               (bounds of deep supernets at init are -1e18 and worse: raw, they swamp L_val)
- "combined":  R_jac + R_cb.
R is a mean over the validation batch; `robust_batch` = N > 0 takes it over the batch's first
N examples only (an unbiased estimate of the same mean: batches are shuffled), so R's passes
cost N/B of the batch's. In images through the supernet a DARTS step is 2B, a DSRNA-Jacobian
step with one projection B (weights) + B (L_val) + 3N (dual directions, x and the moved
points): 2.5x DARTS at N = B, 1.375x at N = B/4.
The weight step is plain DARTS (or the configured adversarial-training strategy).

BatchNorm while computing R (`bn_stats`): the supernet searches in train mode, where BN
normalises by batch statistics and couples the examples of a batch. R is computed on the
same validation batch with BN *frozen* to an affine map: "running" (default) uses the running
statistics as they were before this step's L_val forward updated them (a copy: the
eval-mode network the certify tables report; interval widths stay finite on deep supernets);
"batch" freezes it to the statistics of the clean validation forward that gives L_val
(captured by hooks, detached), so R describes the function the search trains (its interval
bounds explode with depth). Detached, they are a stop-gradient: the α step follows R's
derivative at fixed statistics, not the total derivative of the L_val - γR it reports (torch's
batch_norm takes no gradient through frozen statistics); a review measured the two differ,
even in sign, on a tiny supernet. "running" statistics do not depend on this step's α, so its
gradient is the total one (tested against finite differences). Either way each example's
bound and Jacobian are its own, R does not touch the running statistics, and no host sync
happens in a step.

One forward fewer (finite differences with "running"): the train-mode forward of L_val and
the frozen forward of the finite differences' points run as one batch, each BatchNorm
normalising the first B rows by their batch statistics and the rest by the copy
(`split_batch_norm`); the same values and gradients as two forwards (tested), the DSRNA
step's kernel launches 10,459 -> 8,454 at the paper size (8,858 with the frozen activation
patterns of robust/jacobian.py; DARTS first order: 5,248).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from distsearch.robust.bounds import margin_lower_bound
from distsearch.robust.jacobian import jacobian_metric
from search_spaces import Supernet
from search_spaces.operations import BatchNorm2d

from .darts import DartsSearcher, val_objective

VARIANTS = ("jacobian", "certified", "combined")
Stats = dict[int, tuple[torch.Tensor, torch.Tensor]]


@contextmanager
def capture_bn_stats(model: nn.Module) -> Iterator[Stats]:
    """Record each BatchNorm2d's input batch mean and biased variance (as train mode uses)."""
    stats: Stats = {}

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        z = inputs[0].detach()
        var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
        stats[id(m)] = (mean, var)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def splittable(model: nn.Module) -> bool:
    """Whether every BatchNorm of the model can run as `split_batch_norm` asks."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return all(isinstance(m, BatchNorm2d) and m.momentum is not None and m.running_mean is not None for m in bns)


def running_stats(model: nn.Module) -> Stats:
    """A copy of every BatchNorm's running mean and variance (one concatenation), keyed as
    capture_bn_stats keys its statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    buffers = [t for m in bns for t in (m.running_mean, m.running_var)]
    copies = iter(torch.cat([t.reshape(-1) for t in buffers]).split([t.numel() for t in buffers]))
    return {id(m): (next(copies).view_as(m.running_mean), next(copies).view_as(m.running_var)) for m in bns}


@contextmanager
def split_batch_norm(model: nn.Module, n: int, stats: Stats) -> Iterator[None]:
    """Every BatchNorm runs the first n examples of its batch as its mode says (the searching
    supernet's: train mode, updating the running statistics) and the rest frozen to `stats`
    (running_stats)."""
    bns = [m for m in model.modules() if isinstance(m, BatchNorm2d)]
    for m in bns:
        m.split = (n, *stats[id(m)])
    try:
        yield
    finally:
        for m in bns:
            m.split = None


@contextmanager
def frozen_bn(model: nn.Module, stats: Stats | None = None) -> Iterator[None]:
    """BN in eval mode for the block; with `stats`, its running buffers temporarily replaced
    by them. Modes and buffer objects are restored exactly afterwards."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            saved.append((m, m.training, m.running_mean, m.running_var))
            m.eval()
            if stats is not None and id(m) in stats:
                m.running_mean, m.running_var = stats[id(m)]
    try:
        yield
    finally:
        for m, training, mean, var in saved:
            m.train(training)
            m.running_mean, m.running_var = mean, var


class DsrnaSearcher(DartsSearcher):
    def __init__(
        self,
        model: Supernet,
        *,
        epochs: int,
        order: str = "first",
        variant: str = "jacobian",
        gamma: float = 0.01,
        eps: float = 0.1,
        norm: str = "linf",
        bound: str = "ibp",
        projections: int = 0,
        jacobian_fd_step: float = 0.0,
        bn_stats: str = "running",
        cb_scale: str = "symlog",
        robust_batch: int = 0,
        weight_strategy: Any = None,
        **optim: Any,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"algorithm.variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        if norm not in ("linf", "l2"):
            raise ValueError(f"algorithm.norm: {norm!r} is not one of 'linf', 'l2'")
        if bound not in ("ibp", "crown"):
            raise ValueError(f"algorithm.bound: {bound!r} is not one of 'ibp', 'crown'")
        if bn_stats not in ("batch", "running"):
            raise ValueError(f"algorithm.bn_stats: {bn_stats!r} is not one of 'batch', 'running'")
        if gamma < 0 or eps < 0 or projections < 0 or jacobian_fd_step < 0 or robust_batch < 0:
            raise ValueError("algorithm: gamma, eps, projections, jacobian_fd_step and robust_batch must be >= 0")
        super().__init__(model, epochs=epochs, order=order, weight_strategy=weight_strategy, **optim)
        self.variant, self.gamma, self.eps, self.norm = variant, gamma, eps, norm
        self.bound, self.projections, self.bn_stats = bound, projections, bn_stats
        self.jacobian_fd_step, self.robust_batch = jacobian_fd_step, robust_batch
        if cb_scale not in ("symlog", "linear"):
            raise ValueError(f"algorithm.cb_scale: {cb_scale!r} is not one of 'symlog', 'linear'")
        self.cb_scale = cb_scale
        # L_val's train-mode forward runs in the finite differences' batch (module text)
        self.fused = variant != "certified" and jacobian_fd_step > 0 and bn_stats == "running" and splittable(model)

    def robustness(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        differentiable: bool = True,
        stats: Stats | None = None,
        evaluate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The metrics of the variant at the current weights, BN frozen to `stats` (default:
        the running statistics themselves); `evaluate`: jacobian_metric's."""
        out: dict[str, torch.Tensor] = {}

        def frozen(z: torch.Tensor) -> torch.Tensor:
            with frozen_bn(self.model, stats):
                return self.model(z)

        if self.variant in ("jacobian", "combined"):
            out["R_jac"] = jacobian_metric(
                frozen,
                x,
                self.eps,
                self.norm,
                self.projections,
                create_graph=differentiable,
                fd_step=self.jacobian_fd_step,
                evaluate=evaluate,
                classes=self.model.classifier.out_features,
            )
        if self.variant in ("certified", "combined"):
            with frozen_bn(self.model, stats), torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                m = margin_lower_bound(self.model, x, y, self.eps, self.norm, self.bound, check_x=False)
                # symlog keeps R_cb finite and its gradient direction intact when interval widths
                # explode with depth (margins of -1e18 at init on 3 cells, NaN on 8 with 'linear').
                out["R_cb"] = (m.sign() * m.abs().log1p()).mean() if self.cb_scale == "symlog" else m.mean()
        return out

    def arch_objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        differentiable = self.gamma > 0  # a config constant, not a data-dependent branch
        # R on the batch's first `robust_batch` examples (batches are shuffled: a random subset)
        xr, yr = (x[: self.robust_batch], y[: self.robust_batch]) if self.robust_batch else (x, y)
        if self.bn_stats == "batch":  # R after L_val, frozen to the statistics of its batch
            with capture_bn_stats(self.model) as stats:
                loss, metrics = super().arch_objective(x, y)
            parts = self.robustness(xr, yr, differentiable, stats)
        else:
            # R reads a copy, taken before L_val's forward updates the running statistics in
            # place (R's graph keeps the ones it read, and torch would not see them change)
            stats = running_stats(self.model)
            if self.fused:  # one forward for L_val (its B rows in train mode) and the moved points
                logits: list[torch.Tensor] = []

                def evaluate(z: torch.Tensor) -> torch.Tensor:
                    with split_batch_norm(self.model, len(x), stats):
                        out = self.model(torch.cat([x, z]))
                    logits.append(out[: len(x)])
                    return out[len(x) :]

                parts = self.robustness(xr, yr, differentiable, stats, evaluate)
                loss, metrics = val_objective(logits[0], y)
            else:
                parts = self.robustness(xr, yr, differentiable, stats)
                loss, metrics = super().arch_objective(x, y)
        R = sum(parts.values())
        metrics["val_ce"] = loss.detach()
        metrics.update({k: v.detach() for k, v in parts.items()})
        metrics["R"] = R.detach()
        if not differentiable:
            return loss, metrics
        return loss - self.gamma * R, metrics

    def arch_step(self, train_batch, val_batch) -> dict[str, torch.Tensor]:
        """DARTS's arch step on L_val - gamma R; reports val_loss as the plain cross-entropy
        (as DARTS does) and the full objective as arch_objective."""
        metrics = super().arch_step(train_batch, val_batch)
        metrics["arch_objective"] = metrics["val_loss"]
        metrics["val_loss"] = metrics.pop("val_ce")
        return metrics
