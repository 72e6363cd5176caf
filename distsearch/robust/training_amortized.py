"""Amortised adversarial training: the inner maximisation shares passes with the outer one.

- free / FreeAT (Shafahi et al. 2019, Alg. 1): each minibatch is replayed m times (m = 8);
  one backward gives ∇_θ and ∇_δ; θ is updated, then δ ← clip_ε(δ + ε·sign ∇_δ). δ starts at 0
  and carries over to the next minibatch (it is the strategy's state: state_dict/load_state_dict,
  so a resumed run continues exactly). Train for epochs/m epochs to match plain training's passes.
- yopo-m-n (Zhang et al. 2019, Alg. 1 and eq. 6): m full forward-backward passes on x + δ,
  each accumulating ∇_θ L/m and giving the adjoint p = ∂L/∂z at the first layer's output
  z = f_0(x + δ); then n cheap updates δ ← clip_ε(δ + a·sign ∇_δ ⟨p, f_0(x + δ)⟩) through
  the first layer only; one optimizer step. Defaults 5-3, a = ε/4, δ ~ U(−ε, ε). Choice: the
  first layer's weights get their gradient from the full passes only.
- freelb (Zhu et al. 2020, Alg. 1): K ascent steps; each back-propagates L/K, so ∇_θ
  accumulates the average over the K points, and moves δ ← Π_{‖δ‖₂≤ε}(δ + a·g/‖g‖₂); one
  optimizer step per batch. The RNG state is restored before each of the K forwards, so
  dropout (and drop-path) masks are the same across them. δ₀ = U(−σ, σ)/√d, σ = ε.
"""

from __future__ import annotations

from typing import Any

import torch

from .attack_base import check_int, check_norm, check_positive, clip_box, normalize, project
from .training_base import PassCounter, Strategy, accumulate, accuracy, cross_entropy, optimizer_params


class Free(Strategy):
    name = "free"
    graph_safe = False  # rebinds the carried delta each step (search/graphed.py)

    def __init__(self, eps: float = 8 / 255, replays: int = 8, norm: str = "linf"):
        eps = check_positive("eps", eps)
        replays = check_int("replays", replays)
        check_norm(norm)
        self.eps, self.replays, self.norm = eps, replays, norm
        self.delta: torch.Tensor | None = None

    def _carried(self, x: torch.Tensor) -> torch.Tensor:
        """The δ carried from the last batch, cut or zero-padded to this batch's size."""
        d = self.delta
        if d is None or d.shape[1:] != x.shape[1:]:
            return torch.zeros_like(x)
        d = d.to(x)
        if d.shape[0] >= x.shape[0]:
            return d[: x.shape[0]].clone()
        return torch.cat([d, torch.zeros_like(x[d.shape[0] :])])

    def _step(self, model, x, y, optimizer, counter: PassCounter) -> dict[str, torch.Tensor]:
        params = optimizer_params(optimizer)
        delta = clip_box(x, self._carried(x))  # δ kept so that x + δ is in the box, as Shafahi et al. do
        losses, accs = [], []
        for _ in range(self.replays):
            delta.requires_grad_(True)
            logits = model(x + delta)
            loss = cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            (g,) = accumulate(loss, params, [delta])
            self.update(optimizer)
            delta = clip_box(x, project(delta.detach() + self.eps * normalize(g, self.norm), self.eps, self.norm))
            losses.append(loss.detach())
            accs.append(accuracy(logits, y))
        self.delta = delta.detach()
        return {"loss": torch.stack(losses).mean(), "acc": torch.stack(accs).mean()}

    def state_dict(self) -> dict[str, Any]:
        return {"delta": None if self.delta is None else self.delta.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = None if state.get("delta") is None else state["delta"].clone()


class Yopo(Strategy):
    name, needs_first_layer = "yopo", True

    def __init__(self, eps: float = 8 / 255, m: int = 5, n: int = 3, alpha: float | None = None):
        eps = check_positive("eps", eps)
        m = check_int("m", m)
        n = check_int("n", n)
        alpha = check_positive("alpha", alpha, allow_none=True)
        self.eps, self.m, self.n = eps, m, n
        self.alpha = alpha if alpha is not None else eps / 4

    def _step(self, model, x, y, optimizer, counter: PassCounter) -> dict[str, torch.Tensor]:
        params = optimizer_params(optimizer)
        optimizer.zero_grad(set_to_none=True)
        delta = clip_box(x, torch.empty_like(x).uniform_(-self.eps, self.eps))
        losses, accs = [], []
        for _ in range(self.m):
            z = model.first_layer(x + delta)
            logits = model.forward_rest(z)
            counter.count(logits)
            loss = cross_entropy(logits, y)
            (p,) = accumulate(loss, params, [z], scale=1.0 / self.m)
            p = p.detach()
            for _ in range(self.n):
                d = delta.requires_grad_(True)
                (g,) = torch.autograd.grad((model.first_layer(x + d) * p).sum(), d)
                delta = clip_box(x, project(delta.detach() + self.alpha * g.sign(), self.eps, "linf"))
            losses.append(loss.detach())
            accs.append(accuracy(logits, y))
        self.update(optimizer)
        return {"loss": torch.stack(losses).mean(), "acc": torch.stack(accs).mean()}


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class FreeLB(Strategy):
    name = "freelb"

    def __init__(
        self, eps: float = 1.0, steps: int = 3, alpha: float | None = None, init: float | None = None, norm: str = "l2"
    ):
        eps = check_positive("eps", eps)
        steps = check_int("steps", steps)
        check_norm(norm)
        alpha = check_positive("alpha", alpha, allow_none=True)
        init = check_positive("init", init, allow_none=True)
        self.eps, self.steps, self.norm = eps, steps, norm
        self.alpha = alpha if alpha is not None else eps / 2
        self.init = init if init is not None else eps

    def _step(self, model, x, y, optimizer, counter: PassCounter) -> dict[str, torch.Tensor]:
        params = optimizer_params(optimizer)
        optimizer.zero_grad(set_to_none=True)
        d0 = torch.empty_like(x).uniform_(-self.init, self.init)
        if self.norm == "l2":
            d0 = d0 / x[0].numel() ** 0.5
        delta = clip_box(x, project(d0, self.eps, self.norm))
        rng = _rng_state(x.device)
        losses, accs = [], []
        for _ in range(self.steps):
            _set_rng_state(rng, x.device)
            delta.requires_grad_(True)
            logits = model(x + delta)
            loss = cross_entropy(logits, y)
            (g,) = accumulate(loss, params, [delta], scale=1.0 / self.steps)
            delta = clip_box(x, project(delta.detach() + self.alpha * normalize(g, self.norm), self.eps, self.norm))
            losses.append(loss.detach())
            accs.append(accuracy(logits, y))
        self.update(optimizer)
        return {"loss": torch.stack(losses).mean(), "acc": torch.stack(accs).mean()}
