"""The adversarial-training strategy interface, min_θ E max_{‖δ‖≤ε} L(f(x+δ; θ), y) (Madry et al. 2018, eq. 2.1).

`strategy.step(model, x, y, optimizer) -> metrics` does the whole update: zero_grad,
the inner maximisation, the parameter gradients and `update(optimizer)` (the gradients'
norm clipped to `grad_clip` when set, as a DARTS search's weight step clips them, then
`optimizer.step()`). Gradients are taken only with respect to the optimizer's parameters
(torch.autograd.grad), so a DARTS supernet's architecture weights, which that optimizer
does not hold, are never touched. Metrics are detached 0-dim tensors (no host
synchronisation inside a step): 'loss', 'acc' and the passes the step used, counted by
hooks rather than assumed: 'forward_passes' (calls of the model),
'backward_passes' (backward passes through a model output) and, for YOPO,
'first_layer_passes' (extra forward-backward passes through `model.first_layer` only).
`fit` is a minimal epoch loop for tests, benchmarks and the CLI (the runner owns the real one).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PassCounter:
    """Counts full forward passes (forward hook on the model) and backward passes (a hook on
    each output that requires grad fires once per backward through it)."""

    def __init__(self, model: nn.Module, first_layer: nn.Module | None = None):
        self.model, self.first_layer = model, first_layer
        self.forward = self.backward = self.first_layer_forward = 0
        self._handles: list[Any] = []

    def count(self, out: torch.Tensor) -> None:
        """Record one full forward (for code that calls first_layer/forward_rest itself)."""
        self.forward += 1
        if out.requires_grad:
            out.register_hook(self._on_backward)

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backward += 1

    def _on_first_layer(self, module: nn.Module, args: Any, out: Any) -> None:
        self.first_layer_forward += 1

    def __enter__(self) -> PassCounter:
        self._handles.append(self.model.register_forward_hook(lambda m, a, out: self.count(out)))
        if self.first_layer is not None:
            self._handles.append(self.first_layer.register_forward_hook(self._on_first_layer))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def accumulate(
    loss: torch.Tensor, params: list[torch.nn.Parameter], inputs: Iterable[torch.Tensor] = (), scale: float = 1.0
) -> tuple[torch.Tensor, ...]:
    """One backward pass: adds scale·∂loss/∂θ into θ.grad and returns ∂loss/∂input for each input
    (unscaled), so FreeAT/FreeLB get ∇_θ and ∇_δ from the same pass."""
    inputs = list(inputs)
    grads = torch.autograd.grad(loss, [*params, *inputs], allow_unused=True)
    for p, g in zip(params, grads):
        if g is None:
            continue
        g = g * scale if scale != 1.0 else g
        if p.grad is None:
            p.grad = g.detach()
        else:
            p.grad.add_(g)
    return tuple(grads[len(params) :])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == y).float().mean()


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


class Strategy:
    """Base class: subclasses implement `_step`; `step` adds the counted passes."""

    name = "base"
    needs_first_layer = False
    grad_clip: float | None = None  # the searchers set optim.grad_clip, run_training its optim.grad_clip
    aux_weight: float = 0.0  # run_training sets model.auxiliary_weight; Standard adds the auxiliary head's loss

    def update(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(), after clipping the gradients' total norm to `grad_clip` if set."""
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(optimizer_params(optimizer), self.grad_clip, foreach=True)
        optimizer.step()

    def _step(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, counter: PassCounter
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> dict[str, torch.Tensor]:
        check_model(self, model)
        first = model.first_layer if self.needs_first_layer else None
        with PassCounter(model, first) as counter:
            metrics = self._step(model, x, y, optimizer, counter)
        metrics["forward_passes"] = torch.tensor(counter.forward)
        metrics["backward_passes"] = torch.tensor(counter.backward)
        if first is not None:
            metrics["first_layer_passes"] = torch.tensor(counter.first_layer_forward - counter.forward)
        return {k: v.detach() for k, v in metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly (FreeAT's carried δ); empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "delta")
        return f"{type(self).__name__}({fields})"


def check_model(strategy: Strategy, model: nn.Module) -> None:
    """Raise ValueError if the strategy cannot train this model (YOPO needs first_layer/forward_rest)."""
    if strategy.needs_first_layer and not (hasattr(model, "first_layer") and hasattr(model, "forward_rest")):
        raise ValueError(
            f"model: strategy {strategy.name!r} needs a model exposing `first_layer` and "
            f"`forward_rest(z)` (search_spaces.Network and distsearch.robust.models do); "
            f"{type(model).__name__} does not"
        )


def fit(
    model: nn.Module,
    strategy: Strategy,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, float]:
    """Train for `epochs` passes over (x, y) in seeded shuffled batches (last partial batch
    dropped); returns the summed passes, the optimizer steps and the last epoch's mean loss/acc."""
    model.train()
    g = torch.Generator().manual_seed(seed)
    totals = {"forward_passes": 0.0, "backward_passes": 0.0, "first_layer_passes": 0.0, "batches": 0.0}
    last: dict[str, list[torch.Tensor]] = {"loss": [], "acc": []}
    n = (x.shape[0] // batch_size) * batch_size
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)[:n].to(x.device)
        last = {"loss": [], "acc": []}
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            metrics = strategy.step(model, x[idx], y[idx], optimizer)
            for key in ("forward_passes", "backward_passes", "first_layer_passes"):
                if key in metrics:
                    totals[key] += float(metrics[key])
            totals["batches"] += 1
            last["loss"].append(metrics["loss"])
            last["acc"].append(metrics["acc"])
    if last["loss"]:
        totals["loss"] = float(torch.stack(last["loss"]).mean())
        totals["acc"] = float(torch.stack(last["acc"]).mean())
    return totals
