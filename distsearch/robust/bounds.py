"""Certified bounds for the DSRNA certified metric R_cb (Hosseini, Yang, Xie, CVPR 2021,
section 3.2) and for verification-based evaluation.

Input sets: the L-inf ball {x' : |x' - x|_inf <= eps} or the L2 ball, each intersected with
the image box [0, 1] (`domain`; None to drop it). Methods:
- "ibp":   interval bounds (bounds_ibp.py); the specification matrix C is folded into the
           last Linear layer (Gowal et al. 2018, eq. 8) so margins are bounded directly.
- "crown": linear back-substitution (bounds_linear.py) from C f with IBP intermediate
           bounds (CROWN-IBP, Zhang et al. 2020), then the elementwise max (min) with the
           IBP lower (upper) bound, so it is never looser than IBP and stays sound.
For L2 balls intersected with the box both the ball's dual-norm bound and the box's interval
bound are valid, and the tighter one is kept.

Margins: m_j = f_y - f_j, j != y, via C = e_y - e_j. `margin_lower_bound` is
min_j of their certified lower bounds (> 0 certifies the example at eps, up to rounding:
`rounding_guard`), differentiable in alpha and w. `certified_radius` bisects on log eps; the
returned radius was verified.
BatchNorm uses running statistics: the bounds are those of the eval-mode network.
Models: a Supernet, a genotype's Network, robust/models.py's small_cnn and mlp, and any
nn.Sequential of the ops bounds_ibp.py knows; anything else (the ResNets' residual blocks, a
Conv2d padding other than zeros, a module called at two input sizes, a subclass adding code to
a bounded class, a forward hook) is refused by name, as are a negative eps and an x outside
`domain` (check_inputs): each would give a certificate that is wrong, not just loose.
"""

from __future__ import annotations

import torch
from torch import nn

from .attack_base import eval_mode
from .bounds_check import check_model
from .bounds_ibp import Box, Trace, head_of, ibp, spec_linear
from .bounds_linear import Back, back

Domain = tuple[float, float] | None
METHODS = ("ibp", "crown")
NORMS = ("linf", "l2")


def _check(norm: str, method: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r} is not one of {NORMS}")
    if method not in METHODS:
        raise ValueError(f"bound method {method!r} is not one of {METHODS}")


def _eps(eps: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0])


def check_inputs(model: nn.Module, x: torch.Tensor, eps: float | torch.Tensor, domain: Domain, full: bool) -> None:
    """One ValueError for what would make a bound wrong rather than loose: a model the rules would
    misread (bounds_check.check_model; its hooks only when `full`), a negative or NaN eps (a number;
    a tensor's values only when `full`), and when `full` an x with NaN or outside `domain`: the
    ball is clamped to the domain, so it would no longer contain x. `full` costs a host sync; a
    search step passes False."""
    check_model(model, hooks=full)
    if not isinstance(eps, torch.Tensor) and not float(eps) >= 0:
        raise ValueError(f"eps: must be a number >= 0, got {eps!r}")
    if full and isinstance(eps, torch.Tensor) and eps.numel() and not bool((eps >= 0).all()):  # NaN fails too
        raise ValueError(f"eps: must be >= 0 everywhere, got values in [{float(eps.min()):g}, {float(eps.max()):g}]")
    if full and domain is not None and x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= domain[0] and hi <= domain[1]):  # NaN fails too
            raise ValueError(
                f"x: values in [{lo:.4g}, {hi:.4g}] lie outside domain={domain}, which the ball is clipped "
                "to: pass images in the domain (normalise inside the model) or the domain x lives in "
                "(domain=None: no box)"
            )


def _bcast(e: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return e.reshape(-1, *[1] * (like.dim() - 1))


def _box_limits(x: torch.Tensor, e: torch.Tensor, domain: Domain) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = x - _bcast(e, x), x + _bcast(e, x)
    if domain is not None:
        lo, hi = lo.clamp(*domain), hi.clamp(*domain)
    return lo, hi


def input_box(x: torch.Tensor, eps: float | torch.Tensor, norm: str, domain: Domain = (0.0, 1.0)) -> Box:
    """The IBP input: the ball's bounding box (L2: plus the ball itself for the first layer)."""
    e = _eps(eps, x)
    lo, hi = _box_limits(x, e, domain)
    return Box(lo, hi) if norm == "linf" else Box(lo, hi, x, e)


def _concretize(
    A: torch.Tensor | None, const, x: torch.Tensor, e: torch.Tensor, norm: str, domain: Domain, shape: tuple[int, int]
) -> torch.Tensor:
    """min of A x' + const over the input set (a lower bound; exact for the box)."""
    if A is None:
        return torch.zeros(shape, dtype=x.dtype, device=x.device) + const
    lo, hi = _box_limits(x, e, domain)
    box = (A.clamp_min(0) * lo.unsqueeze(1) + A.clamp_max(0) * hi.unsqueeze(1)).flatten(2).sum(-1)
    if norm == "linf":
        return box + const
    ball = (A * x.unsqueeze(1)).flatten(2).sum(-1) - e.unsqueeze(1) * A.flatten(2).norm(dim=-1)
    return (torch.maximum(ball, box) if domain is not None else ball) + const


def spec_bounds(
    model: nn.Module,
    x: torch.Tensor,
    eps: float | torch.Tensor,
    norm: str = "linf",
    method: str = "ibp",
    C: torch.Tensor | None = None,
    domain: Domain = (0.0, 1.0),
    lower_only: bool = False,
    check_x: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Certified (lower, upper) bounds of C f(x') over the input set; C: [B, S, K] (default I).

    With lower_only the upper bound is None (half the linear-bound cost). `check_x`: refuse an
    x outside `domain` and a model with hooks (a host sync; check_inputs)."""
    _check(norm, method)
    check_inputs(model, x, eps, domain, check_x)
    trace = Trace()
    head = head_of(model)
    box = input_box(x, eps, norm, domain)
    if head is not None:
        feat = ibp(model, box, trace, skip_head=True)
        K = head.out_features
        C = torch.eye(K, dtype=x.dtype, device=x.device).expand(x.shape[0], K, K) if C is None else C
        out = spec_linear(head.weight, head.bias, C, feat)
    else:
        out = ibp(model, box, trace)
        out = out.each(lambda t: t.flatten(1))
        K = out.shape[1]
        C = torch.eye(K, dtype=x.dtype, device=x.device).expand(x.shape[0], K, K) if C is None else C
        out = spec_linear(torch.eye(K, dtype=x.dtype, device=x.device), None, C, out)
    lower, upper = out.lo, out.up
    if method == "crown":
        S = C.shape[1]
        spec = C if lower_only else torch.cat([C, -C], dim=1)
        st = Back(trace)
        A = back(model, spec, st)
        lin = _concretize(A, st.const, x, _eps(eps, x), norm, domain, (x.shape[0], spec.shape[1]))
        lower = torch.maximum(lower, lin[:, :S])
        if not lower_only:
            upper = torch.minimum(upper, -lin[:, S:])
    return lower, (None if lower_only else upper)


def margin_matrix(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C [B, K-1, K] with rows e_y - e_j for the K-1 classes j != y."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    j = torch.arange(num_classes - 1, device=y.device)
    others = j + (j.unsqueeze(0) >= y.unsqueeze(1)).long()  # [B, K-1]: the classes != y, in order
    return eye[y].unsqueeze(1) - eye[others]  # no boolean mask: no host sync inside a search step


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    head = head_of(model)
    if head is not None:
        return head.out_features
    with torch.no_grad(), eval_mode(model):  # a training-mode forward would move BatchNorm's statistics
        return model(x[:1]).shape[1]


def margin_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: str = "linf",
    method: str = "ibp",
    domain: Domain = (0.0, 1.0),
    check_x: bool = True,
) -> torch.Tensor:
    """Certified lower bounds [B, K-1] of the margins f_y - f_j (j != y) over the input set."""
    C = margin_matrix(y, _num_classes(model, x), x.dtype)
    return spec_bounds(model, x, eps, norm, method, C, domain, lower_only=True, check_x=check_x)[0]


def margin_lower_bound(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    norm: str = "linf",
    method: str = "ibp",
    domain: Domain = (0.0, 1.0),
    check_x: bool = True,
) -> torch.Tensor:
    """Certified lower bound [B] of f_y - max_{j != y} f_j; > 0 certifies the example at eps."""
    return margin_bounds(model, x, y, eps, norm, method, domain, check_x).min(dim=1).values


ROUNDING_ULPS = 100  # the certification slack, in machine epsilons of the logit scale


@torch.no_grad()
def rounding_guard(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(right, slack), each [B]: the bounds are computed in the model's precision without outward
    rounding, so a lower bound can exceed the true worst case by rounding (measured: up to 9e-7 of
    the largest |logit| in float32, 6e-15 in float64, also at eps = 0, where a misclassified example
    then looked certified). An example counts as certified only when its bound exceeds `slack`
    (ROUNDING_ULPS machine epsilons of its largest |logit|) and the forward itself classifies it
    right by more than that (`right`)."""
    with eval_mode(model):
        f = model(x)
    slack = ROUNDING_ULPS * torch.finfo(f.dtype).eps * f.abs().amax(1)
    margin = torch.einsum("bjk,bk->bj", margin_matrix(y, f.shape[1], f.dtype), f).min(1).values
    return margin > slack, slack


def certified_metric(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    method: str = "ibp",
    domain: Domain = (0.0, 1.0),
    check_x: bool = True,
) -> torch.Tensor:
    """R_cb: the batch mean of the certified worst-case margin at eps (differentiable)."""
    return margin_lower_bound(model, x, y, eps, norm, method, domain, check_x).mean()


@torch.no_grad()
def certified_radius(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "linf",
    method: str = "ibp",
    eps_max: float = 1.0,
    steps: int = 12,
    domain: Domain = (0.0, 1.0),
    octaves: int = 20,
) -> torch.Tensor:
    """Per-example certified radius in [0, eps_max]: eps_max if certified there, else a
    bisection of log eps on [eps_max / 2^octaves, eps_max], so the radius is found to a
    relative precision of 2^(octaves / 2^steps) (0.34 % by default) whatever its size: a
    linear bisection of the L2 box's diameter (28 for MNIST) would resolve only 0.007. 0 when
    the example is not certified at eps_max / 2^octaves (misclassified ones among them).
    Every returned radius r was verified (margin lower bound > rounding_guard's slack at r, and x
    classified right)."""
    check_inputs(model, x, float(eps_max), domain, full=True)
    right, slack = rounding_guard(model, x, y)

    def certified(e: torch.Tensor) -> torch.Tensor:
        return right & (margin_lower_bound(model, x, y, e, norm, method, domain, check_x=False) > slack)

    hi = torch.full((x.shape[0],), float(eps_max), dtype=x.dtype, device=x.device)
    lo = hi * 2.0**-octaves
    ok_hi, ok_lo = certified(hi), certified(lo)
    for _ in range(steps):
        mid = (lo * hi).sqrt()
        ok = certified(mid)
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return torch.where(ok_hi, hi.new_tensor(float(eps_max)), torch.where(ok_lo, lo, torch.zeros_like(lo)))
