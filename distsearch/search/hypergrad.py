"""One-step unrolled hypergradient (DARTS, Liu et al. 2019, eqs. 6-8), written once for
DARTS, LeaSE and DSRNA.

With w' = w - xi * (grad_w L_tr(w, a) + wd * w), the architecture gradient is
    grad_a L_val(w', a) - xi * grad^2_{a,w} L_tr(w, a) . grad_w' L_val(w', a)      (eq. 7)
and the mixed second derivative times the vector v = grad_w' L_val(w', a) is taken by
central finite differences (eq. 8):
    (grad_a L_tr(w+, a) - grad_a L_tr(w-, a)) / (2R),   w+- = w +- R v,  R = r / ||v||.
A ReLU or max pool that changes its choice between w- and w+ adds an O(1/R) term to that
difference: on a 5-cell supernet (C=8, B=8, float64) the second-order term was 770 % off the
exact one at r = 0.01 and 6,500 % at r = 1e-4. So w+ and w- replay the ReLU masks and max-pool
choices the virtual step's forward at w recorded (search_spaces/pattern.py): the loss is
smooth along the segment and the difference exact to O(R^2).
The loss closures are re-evaluated at the current (temporarily modified) weights, so any
objective works: DSRNA passes L_val - gamma * R, LeaSE composes these pieces.
As the paper's eq. 6 (not the reference code), the virtual step has no momentum term (the
reference adds 0.9 times the optimizer's momentum buffer to it). Every extra forward (at w,
at w', at w +- R v) runs on the live model in its mode: in train mode their batches move the
BN running statistics, as the reference code's do (except its L_val at w', run on a copy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from search_spaces.pattern import Pattern, recording, replaying

Loss = Callable[[], torch.Tensor]


def param_grads(loss: torch.Tensor, params: Sequence[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
    """d loss / d params, zeros for a parameter it does not reach (kw: torch.autograd.grad's)."""
    gs = torch.autograd.grad(loss, list(params), allow_unused=True, **kw)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


@torch.no_grad()
def restore(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """dst[i] <- src[i] in one foreach copy (undoes virtual_step with its backup)."""
    torch._foreach_copy_(list(dst), list(src))


@torch.no_grad()
def _backup(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the weights as views of one flat buffer: one kernel, not one per tensor."""
    flat = torch.cat([w.reshape(-1) for w in weights])
    return [b.view_as(w) for b, w in zip(flat.split([w.numel() for w in weights]), weights)]


def finite_diff_hvp(
    arch: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    loss: Loss,
    v: Sequence[torch.Tensor],
    r: float = 0.01,
    pattern: Pattern | None = None,
) -> list[torch.Tensor]:
    """grad^2_{a,w} loss . v by central differences on w (eq. 8); weights restored bitwise.
    `pattern`: the choices `loss` made at w (virtual_step records them), replayed at w+-;
    None: plain differences, off by O(1/R) wherever a kink lies within R (module text)."""
    replay = (lambda: replaying(pattern)) if pattern is not None else nullcontext
    backup = _backup(weights)
    R = r / torch.cat([x.reshape(-1) for x in v]).norm().clamp_min(1e-12)
    with torch.no_grad():
        torch._foreach_add_(list(weights), torch._foreach_mul(list(v), R))
    with replay():
        lp = loss()
    g_pos = param_grads(lp, arch)
    with torch.no_grad():
        torch._foreach_add_(list(weights), torch._foreach_mul(list(v), -2 * R))
    with replay():
        ln = loss()
    g_neg = param_grads(ln, arch)
    restore(weights, backup)
    return [(gp - gn) / (2 * R) for gp, gn in zip(g_pos, g_neg)]


def virtual_step(
    weights: Sequence[torch.Tensor],
    train_loss: Loss,
    xi: float,
    weight_decay: float = 0.0,
    pattern: Pattern | None = None,
) -> list[torch.Tensor]:
    """Move the weights in place to w' = w - xi (grad L_tr + wd w); returns the backup of w.
    `pattern`: records train_loss's choices at w, for finite_diff_hvp."""
    with recording(pattern) if pattern is not None else nullcontext():
        lt = train_loss()
    g = param_grads(lt, weights)
    backup = _backup(weights)
    with torch.no_grad():  # the same arithmetic as w.sub_(xi * (g + wd * w)), a few kernels for all tensors
        step = torch._foreach_mul(list(weights), weight_decay)
        torch._foreach_add_(step, g)
        torch._foreach_mul_(step, xi)
        torch._foreach_sub_(list(weights), step)
    return backup


def unrolled_arch_grad(
    arch: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    train_loss: Loss,
    val_loss: Loss,
    xi: float,
    weight_decay: float = 0.0,
    r: float = 0.01,
    replay: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Second-order DARTS gradient of val_loss w.r.t. arch (eq. 7). Returns (grads, L_val(w')).
    replay=False: plain differences (for comparison: benchmarks/hypergrad_accuracy.py)."""
    pattern = Pattern() if replay else None
    backup = virtual_step(weights, train_loss, xi, weight_decay, pattern)
    lv = val_loss()
    g = param_grads(lv, list(arch) + list(weights))
    d_arch, d_w = g[: len(arch)], g[len(arch) :]
    restore(weights, backup)
    hv = finite_diff_hvp(arch, weights, train_loss, d_w, r, pattern)
    return [da - xi * h for da, h in zip(d_arch, hv)], lv.detach()


def first_order_arch_grad(arch: Sequence[torch.Tensor], val_loss: Loss) -> tuple[list[torch.Tensor], torch.Tensor]:
    """First-order DARTS: grad_a L_val(w, a) at the current weights."""
    lv = val_loss()
    return param_grads(lv, arch), lv.detach()


def assign_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.detach()
