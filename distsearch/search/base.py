"""The Searcher interface: one bilevel search algorithm over a supernet.

`step(train_batch, val_batch)` does one architecture update and one weight update and
returns its metrics as detached 0-dim tensors (no host sync inside a step: the runner
converts them to floats once per logging interval). `state_dict()` covers everything a
resumed search needs to continue exactly: weights, alphas, optimisers, schedulers, RNG.
Loading keeps the hyperparameters this searcher was built with where they differ from the
checkpoint's (PBT restarts a trial from a donor's checkpoint with mutated learning rates):
the optimiser state (momenta) comes from the checkpoint, the schedule from the config.
Algorithms only: no config, storage or TensorBoard here (see ../shared/DESIGN.md).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from search_spaces import Genotype
from search_spaces.layout import is_per_edge, regroup_optimizer

Batch = tuple[torch.Tensor, torch.Tensor]
SCHEDULE_KEYS = ("base_lrs", "eta_min", "T_max")
IMPLEMENTATION_KEYS = ("params", "capturable", "foreach", "fused", "differentiable")  # not hyperparameters
log = logging.getLogger(__name__)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == y).float().mean()


def rng_state(device: torch.device | str) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device | str) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


class Searcher(ABC):
    """Base class: owns the supernet, its two optimisers and the weight-lr scheduler."""

    model: nn.Module
    w_optimizer: torch.optim.Optimizer
    a_optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @abstractmethod
    def step(self, train_batch: Batch, val_batch: Batch) -> dict[str, torch.Tensor]:
        """One architecture step and one weight step; metrics as detached 0-dim tensors."""

    def genotype(self) -> Genotype:
        return self.model.derive()

    def end_epoch(self) -> None:
        """Called by the runner after each epoch (steps the lr schedule)."""
        self.scheduler.step()

    def learning_rates(self) -> dict[str, float]:
        return {"lr/weights": self.w_optimizer.param_groups[0]["lr"], "lr/arch": self.a_optimizer.param_groups[0]["lr"]}

    def extra_state(self) -> dict[str, Any]:
        """Subclasses with more modules or optimisers (LeaSE's audience) add them here."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Counterpart of extra_state()."""

    def state_dict(self) -> dict[str, Any]:
        device = next(self.model.parameters()).device
        return {
            "model": self.model.state_dict(),
            "w_optimizer": self.w_optimizer.state_dict(),
            "a_optimizer": self.a_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(device),
            "extra": self.extra_state(),
            "weight_strategy": strategy.state_dict() if (strategy := getattr(self, "weight_strategy", None)) else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(self.model.parameters()).device
        optimisers, schedulers = self._optimisers(), self._schedulers()
        configured = hyperparameters(optimisers, schedulers)
        w_state = state["w_optimizer"]
        if is_per_edge(state["model"]):  # a checkpoint of the per-edge supernet: its momenta regrouped
            w_state = regroup_optimizer(self.model, state["model"], w_state)
        self.model.load_state_dict(state["model"])  # regroups a per-edge state itself
        self.w_optimizer.load_state_dict(w_state)
        self.a_optimizer.load_state_dict(state["a_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], device)
        self.load_extra_state(state.get("extra", {}))
        if (strategy := getattr(self, "weight_strategy", None)) is not None:
            strategy.load_state_dict(state.get("weight_strategy", {}))
        adopt_hyperparameters(optimisers, schedulers, configured)
        if device.type != "cuda":  # a checkpoint of a CUDA-graph run (capturable Adam) resumed off the GPU
            for opt in optimisers.values():
                for group in opt.param_groups:
                    if group.get("capturable"):
                        group["capturable"] = False

    # -- hyperparameters across a load (PBT) -------------------------------------------------
    def _optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def _schedulers(self) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.lr_scheduler.LRScheduler)}


def hyperparameters(
    optimisers: dict[str, torch.optim.Optimizer], schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
) -> dict[str, Any]:
    """The optimisers' group settings and the schedules, as built from the config (before a load)."""
    groups = {
        k: [{h: v for h, v in g.items() if h not in IMPLEMENTATION_KEYS} for g in o.param_groups]
        for k, o in optimisers.items()
    }
    schedules = {k: {h: getattr(s, h) for h in SCHEDULE_KEYS if hasattr(s, h)} for k, s in schedulers.items()}
    return {"groups": groups, "schedules": schedules}


def adopt_hyperparameters(
    optimisers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
    configured: dict[str, Any],
) -> list[str]:
    """After a load: put back the configured settings (`hyperparameters()` taken before it) that
    differ from the loaded ones; a scheduled lr is recomputed from the configured schedule at the
    loaded epoch (a resume with more epochs anneals over the new T_max). Logs and returns the changes."""
    changes: list[str] = []

    def adopt(name: str, current: dict[str, Any], want: dict[str, Any], skip: str = "") -> list[str]:
        differ = [h for h, v in want.items() if h != skip and _differs(current.get(h), v)]
        for h in differ:
            changes.append(f"{name}.{h}: {current.get(h)} -> {want[h]}")
            current[h] = want[h]
        return differ

    scheduled = {id(s.optimizer): (k, s) for k, s in schedulers.items()}
    for name, opt in optimisers.items():
        key, sched = scheduled.get(id(opt), (None, None))
        skip = "lr" if sched is not None else ""  # a scheduled lr follows its schedule (below)
        groups = zip(opt.param_groups, configured["groups"][name], strict=True)
        base_moved = any(["initial_lr" in adopt(name, g, w, skip) for g, w in groups])  # every group adopts
        if sched is None:
            continue
        # the schedule's settings are plain attributes (base_lrs, eta_min, T_max)
        schedule_moved = bool(adopt(key, vars(sched), configured["schedules"][key]))
        if (base_moved or schedule_moved) and hasattr(sched, "_get_closed_form_lr"):  # the cosine ones have it
            for group, lr in zip(opt.param_groups, sched._get_closed_form_lr(), strict=True):
                group["lr"] = lr
            sched._last_lr = [g["lr"] for g in opt.param_groups]
    for change in changes:
        log.warning("resumed with a changed hyperparameter: %s", change)
    return changes


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b, strict=False))
    return a != b
