"""The Jacobian robustness metric of DSRNA (Hosseini, Yang, Xie, CVPR 2021, section 3.1).

|f_k(x + delta) - f_k(x)| ~ |J_k(x) delta| <= ||J_k(x)||_q ||delta||_p with 1/p + 1/q = 1
(L-inf attack -> q = 1, L2 -> q = 2), so the metric is
    R_jac = -(eps / K) sum_k ||J_k(x)||_q,   averaged over the examples x.
Exact norms take K backward passes (one per class) with create_graph=True, so R_jac is
differentiable in alpha and w. Each example's Jacobian is its own only when the examples of
the batch do not interact: run the model with BatchNorm frozen (eval mode, or the DSRNA
searcher's `frozen_bn`).

Random projections (Hoffman, Roberts, Yaida 2019, eq. 4): for v ~ N(0, I_K),
E ||v^T J||_2^2 = ||J||_F^2 and sqrt(pi/2) E ||v^T J||_1 = sum_d ||J_{:,d}||_2 =: ||J||_{2,1};
each draw costs one backward pass instead of K. The projected metric replaces
sum_k ||J_k||_q by ||J||_F (q = 2) or ||J||_{2,1} (q = 1); both lie within a factor sqrt(K)
of it from below (S <= sum_k ||J_k||_q <= sqrt(K) S), so the surrogate ranks architectures
alike but is a different number: `R_jac` is only comparable at equal `projections`.

Without a double backward (`fd_step` > 0): ||g||_q for g = v^T J(x) (v = e_k exactly, or a
random projection) is max over ||u||_p <= 1 of v^T J u, attained at the dual direction
u* = sign(g) (L-inf) or g / ||g||_2 (L2). Every u* (all rows v, all classes for the exact
norms) comes from one plain backward (no graph) through copies of x side by side, then
    v^T J u* = v^T (f(x + h u*) - f(x)) / h
from one more forward (batched with f(x) again, so that the parameters' gradient takes one
backward through one graph), and by Danskin's theorem the gradient in (alpha, w) of the
max equals that of v^T J u* with u* held fixed, which the two forwards give by ordinary
backpropagation. The moved points keep x's ReLU masks and max-pool choices
(search_spaces/pattern.py), so the difference is exact for any h in exact arithmetic: a
plain difference crossing a kink within h gets an O(1/h) error in its gradient (70-290 %
at h = 1e-3 on a 5-cell supernet). The value itself is g . u* = ||g||_q from the plain
backward. Same gradients as the double backward to rounding, which falls as h grows (fp32:
1e-7 relative at h = 1, 1e-4 at 1e-3): take h = 1; off bf16. Exact for networks built from
search_spaces' ops only: other nonlinearities are differenced as they are.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from search_spaces.double_backward import differentiated_twice
from search_spaces.pattern import frozen_pattern

Model = Callable[[torch.Tensor], torch.Tensor]


def dual_q(norm: str) -> float:
    """Hölder dual exponent q of the attack norm: linf -> 1, l2 -> 2."""
    if norm == "linf":
        return 1.0
    if norm == "l2":
        return 2.0
    raise ValueError(f"norm {norm!r} is not one of 'linf', 'l2'")


def _inputs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _forward(model: Model, xg: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """model(xg), marked for a double backward when create_graph (search_spaces/double_backward.py)."""
    with differentiated_twice(param_grads=False) if create_graph else contextlib.nullcontext():
        return model(xg)


def jacobian_norms(model: Model, x: torch.Tensor, norm: str = "linf", create_graph: bool = True) -> torch.Tensor:
    """Exact ||J_k(x_i)||_q for every example i and class k: [B, K]."""
    q = dual_q(norm)
    with torch.enable_grad():
        xg = _inputs(x)
        out = _forward(model, xg, create_graph)
        K = out.shape[1]
        norms = []
        for k in range(K):
            (g,) = torch.autograd.grad(out[:, k].sum(), xg, create_graph=create_graph, retain_graph=True)
            norms.append(g.flatten(1).norm(p=q, dim=1))
    return torch.stack(norms, dim=1)


def projection_samples(
    model: Model,
    x: torch.Tensor,
    norm: str = "linf",
    n_proj: int = 1,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[n_proj, B] unbiased single-draw estimates: ||v^T J||_2^2 (of ||J||_F^2) for L2,
    sqrt(pi/2) ||v^T J||_1 (of ||J||_{2,1}) for L-inf; v ~ N(0, I_K) per example and draw."""
    return _projections(model, x, norm, n_proj, create_graph, generator)[0]


def directional_norms(
    model: Model,
    x: torch.Tensor,
    weights: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    norm: str,
    fd_step: float,
    evaluate: Model | None = None,
) -> tuple[torch.Tensor, int]:
    """[n, B] ||V_i^T J(x)||_q for the n row weightings V = weights(f(x)) [n, B, K], by the
    finite difference along each dual direction (see the module text), differentiable in the
    model's parameters; and K. The n dual directions come from one backward through a batch
    of n copies of x (the model must treat its examples apart: BN frozen): more forward work
    than n backwards through one forward of x, but 1/n of the kernel launches. `evaluate`
    (default: the model) runs the batch of x and the moved points: the DSRNA searcher passes
    one that also runs its validation batch."""
    q = dual_q(norm)
    B = x.shape[0]
    with torch.enable_grad():
        xg = _inputs(x.repeat(n, *[1] * (x.dim() - 1)))
        out = model(xg)
        V = weights(out[:B].detach())
        if V.shape[0] != n:
            raise ValueError(f"weights gave {V.shape[0]} row weightings for {n} copies of x")
        (g,) = torch.autograd.grad(out, xg, V.flatten(0, 1))  # out's graph serves these only
        g = g.flatten(1)
        u = g.sign() if q == 1 else g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
        # f(x) again beside all the moved points: one batch, so (alpha, w) take one backward;
        # the moved points take x's ReLU and max-pool choices (search_spaces/pattern.py)
        with frozen_pattern(B, n):
            both = (evaluate or model)(torch.cat([x.detach(), xg.detach() + fd_step * u.view_as(xg)]))
        base, moved = both[:B], both[B:].view(V.shape)
    value = g.norm(p=q, dim=1).view(V.shape[:2])  # ||V_i^T J||_q = g . u*, exactly
    fd = ((moved - base.unsqueeze(0)) * V).sum(-1) / fd_step  # its (alpha, w)-gradient
    return value + (fd - fd.detach()), out.shape[1]


def _projections(
    model: Model,
    x: torch.Tensor,
    norm: str,
    n_proj: int,
    create_graph: bool,
    generator: torch.Generator | None,
    fd_step: float = 0.0,
    evaluate: Model | None = None,
) -> tuple[torch.Tensor, int]:
    q = dual_q(norm)
    if fd_step > 0:
        draw = lambda out: torch.stack(  # the same draws, in the same order, as the double-backward path
            [torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator) for _ in range(n_proj)]
        )
        s, K = directional_norms(model, x, draw, n_proj, norm, fd_step, evaluate)
        return (s.square() if q == 2 else math.sqrt(math.pi / 2) * s), K
    with torch.enable_grad():
        xg = _inputs(x)
        out = _forward(model, xg, create_graph)
        samples = []
        for _ in range(n_proj):
            v = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator)
            (g,) = torch.autograd.grad(out, xg, v, create_graph=create_graph, retain_graph=True)
            g = g.flatten(1)
            samples.append(g.square().sum(1) if q == 2 else math.sqrt(math.pi / 2) * g.abs().sum(1))
    return torch.stack(samples), out.shape[1]


def projected_jacobian_norm(
    model: Model,
    x: torch.Tensor,
    norm: str = "linf",
    n_proj: int = 1,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B] estimate of ||J||_F (L2) or ||J||_{2,1} (L-inf) from n_proj random projections. The
    L-inf one is unbiased; the L2 one is the square root of an unbiased estimate of ||J||_F^2, so
    biased low by Jensen's inequality (measured with K = 3: about 10 % at n_proj = 1, 3.5 % at 4)."""
    return _surrogate(projection_samples(model, x, norm, n_proj, create_graph, generator), norm)


def _surrogate(samples: torch.Tensor, norm: str) -> torch.Tensor:
    s = samples.mean(0)
    return s.clamp_min(1e-24).sqrt() if norm == "l2" else s


def exact_surrogate(model: Model, x: torch.Tensor, norm: str = "linf") -> torch.Tensor:
    """[B] the exact value the projection samples estimate: ||J||_F^2 (L2) or ||J||_{2,1} (L-inf)."""
    dual_q(norm)
    with torch.enable_grad():
        xg = _inputs(x)
        out = model(xg)
        rows = [torch.autograd.grad(out[:, k].sum(), xg, retain_graph=True)[0].flatten(1) for k in range(out.shape[1])]
    J = torch.stack(rows, dim=1)  # [B, K, D]
    return J.square().sum((1, 2)) if norm == "l2" else J.norm(dim=1).sum(1)


def jacobian_metric(
    model: Model,
    x: torch.Tensor,
    eps: float,
    norm: str = "linf",
    projections: int = 0,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
    fd_step: float = 0.0,
    evaluate: Model | None = None,
    classes: int | None = None,
) -> torch.Tensor:
    """R_jac = -(eps / K) sum_k ||J_k(x)||_q averaged over x (exact when projections == 0,
    else with the projected surrogate above); a differentiable 0-dim tensor. `fd_step` > 0:
    the norms by finite differences along their dual directions instead of a double backward
    (`evaluate`: see directional_norms; exact norms need K = `classes`, else one forward of
    one example finds it)."""
    if projections > 0:
        samples, K = _projections(model, x, norm, projections, create_graph, generator, fd_step, evaluate)
        total = _surrogate(samples, norm)
    elif fd_step > 0:  # v = e_k for every example and class
        if classes is None:
            with torch.no_grad():
                classes = model(x[:1]).shape[1]
        unit = lambda out: torch.eye(out.shape[1], dtype=out.dtype, device=out.device)[:, None, :].expand(
            -1, *out.shape
        )
        norms, K = directional_norms(model, x, unit, classes, norm, fd_step, evaluate)
        total = norms.sum(0)
    else:
        norms = jacobian_norms(model, x, norm, create_graph)
        K, total = norms.shape[1], norms.sum(1)
    return -(eps / K) * total.mean()
