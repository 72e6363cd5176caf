"""LeaSE stage 2 and 3 inputs: explanations by adversarial attack, and the weighted input.

Stage 2 of LeaSE (Hosseini & Xie, arXiv 2012.12899, eq. 2; ../shared/PAPERS.md):
    delta_i* = argmax_{||delta|| <= eps} l(f(x_i + delta; E), t_i),
with t_i = argmax f(x_i; E) (objective `prediction`: move the explainer off its own
prediction, the seed's form) or the true label (objective `label`). Solved by PGD (Madry et
al. 2018): random start in the ball, `steps` ascent steps of size a (sign of the gradient
for L-inf, the L2-normalised gradient for L2), projection onto the eps-ball and the image
box [0, 1] after each step.

Stage 3 input (eq. 3): delta * x (`delta`, the seed's default), |delta| * x (`abs_delta`)
or (|delta| + 1) * x (`abs_delta_plus_one`).

`pgd_explanation` is a pure function of a logits closure `forward(z)`, so the same code
(i) runs without a graph for stage 2, (ii) builds its last `differentiable_steps` steps
with create_graph=True for the stage-4 hypergradient (search/lease.py), and (iii) is
differentiated exactly through torch.func.functional_call in the tests.

The derivative of sign(g) is zero almost everywhere, so through an exactly differentiated
L-inf PGD the audience term of the hypergradient would vanish. The L-inf step therefore
uses a straight-through surrogate: its value is sign(g) exactly, its derivative is that of
g / mean|g| (per example; same mean magnitude as sign(g)). This is part of the definition
of the differentiable attack (the tests differentiate the very same graph), not a
numerical approximation. The projections (clamps) are differentiated as they are: a
coordinate clamped to +-eps or to the box edge passes no gradient, while one that lands on
the bound exactly passes it (torch.clamp's convention). Rounding decides which of the two a
coordinate stepped eps -> eps - a -> eps is: measured on a tiny supernet (eps 0.1, steps of
0.04), 3-6 % of the gradient through the audience; none at the paper's 8/255 and 2/255.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from search_spaces.double_backward import differentiated_twice

Forward = Callable[[torch.Tensor], torch.Tensor]
NORMS = ("linf", "l2")
WEIGHTINGS = ("delta", "abs_delta", "abs_delta_plus_one")


def _per_example(t: torch.Tensor) -> tuple[int, ...]:
    return (t.shape[0],) + (1,) * (t.dim() - 1)


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(_per_example(t))


def step_direction(g: torch.Tensor, norm: str, differentiable: bool) -> torch.Tensor:
    """sign(g) for L-inf (straight-through surrogate g/mean|g| when differentiable), g/||g||_2 for L2."""
    if norm == "l2":
        return g / _l2(g)
    s = g.sign()
    if not differentiable:
        return s
    surrogate = g / g.abs().flatten(1).mean(dim=1).clamp_min(1e-30).view(_per_example(g))
    return s + (surrogate - surrogate.detach())


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Onto the eps-ball, then into the image box: x + delta in [0, 1] (stays in the ball)."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2(delta)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


def random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """A random point of the eps-ball (uniform per coordinate for L-inf; random direction and
    radius for L2), projected into the box. Draws from the global torch RNG."""
    if norm == "linf":
        d = (2 * torch.rand_like(x) - 1) * eps
    else:
        n = torch.randn_like(x)
        d = n / _l2(n) * eps * torch.rand(_per_example(x), dtype=x.dtype, device=x.device)
    return project(d, x, eps, norm)


def attack_target(forward: Forward, x: torch.Tensor, y: torch.Tensor, objective: str) -> torch.Tensor:
    """The class the attack moves away from: the explainer's prediction or the label."""
    if objective == "label":
        return y
    with torch.no_grad():
        return forward(x).argmax(dim=1)


def pgd_explanation(
    forward: Forward,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str,
    delta0: torch.Tensor,
    differentiable_steps: int = 0,
) -> torch.Tensor:
    """PGD ascent on CE(forward(x + delta), target) from delta0 (eq. 2).

    The first `steps - differentiable_steps` steps run on detached iterates; the last
    `differentiable_steps` keep the graph (create_graph=True) so the result is
    differentiable in whatever `forward` closes over (the explainer's E' and A).
    """
    if norm not in NORMS:
        raise ValueError(f"norm: {norm!r} is not one of {NORMS}")
    first_graph_step = steps - max(0, min(differentiable_steps, steps))
    delta = delta0.detach()
    with torch.enable_grad():
        for t in range(steps):
            graph = t >= first_graph_step
            if not graph or not delta.requires_grad:
                delta = delta.detach().requires_grad_(True)
            with differentiated_twice(param_grads=False) if graph else contextlib.nullcontext():
                loss = F.cross_entropy(forward(x + delta), target, reduction="sum")
            (g,) = torch.autograd.grad(loss, delta, create_graph=graph)
            if graph:
                delta = project(delta + step_size * step_direction(g, norm, True), x, eps, norm)
            else:
                with torch.no_grad():
                    delta = project(delta + step_size * step_direction(g, norm, False), x, eps, norm)
    return delta if differentiable_steps > 0 else delta.detach()


@torch.no_grad()
def attack_metrics(forward: Forward, x: torch.Tensor, delta: torch.Tensor, target: torch.Tensor) -> dict:
    """Attack loss (mean CE to the target at x + delta) and success rate (prediction != target)."""
    logits = forward(x + delta)
    return {
        "attack_loss": F.cross_entropy(logits, target),
        "attack_success": (logits.argmax(dim=1) != target).float().mean(),
    }


def weight_input(delta: torch.Tensor, x: torch.Tensor, weighting: str) -> torch.Tensor:
    """The audience's input (stage 3): delta*x, |delta|*x or (|delta|+1)*x."""
    if weighting == "delta":
        return delta * x
    if weighting == "abs_delta":
        return delta.abs() * x
    if weighting == "abs_delta_plus_one":
        return (delta.abs() + 1) * x
    raise ValueError(f"weighting: {weighting!r} is not one of {WEIGHTINGS}")


def to_display(t: torch.Tensor, signed: bool) -> torch.Tensor:
    """Per-image rescale into [0, 1] for image grids (signed: 0 maps to 0.5)."""
    t = t.detach()
    scale = t.abs().flatten(1).amax(dim=1).clamp_min(1e-12).view(_per_example(t))
    return 0.5 + 0.5 * t / scale if signed else (t / scale).clamp(0, 1)
