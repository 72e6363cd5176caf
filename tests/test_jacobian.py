"""The Jacobian metric (robust/jacobian.py): exact per-class norms against
torch.autograd.functional.jacobian, the random-projection estimator's mean against the exact
value, and the alpha-gradient of R_jac against finite differences (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distsearch.robust.jacobian import (
    exact_surrogate,
    jacobian_metric,
    jacobian_norms,
    projected_jacobian_norm,
    projection_samples,
)
from search_spaces import Supernet


def tiny_supernet(seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    m = Supernet(in_channels=1, num_classes=4, C=4, layers=3, nodes=2)  # a normal cell, then two reduce
    with torch.no_grad():
        m.alphas_normal.normal_()
        m.alphas_reduce.normal_()
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_var.uniform_(0.5, 1.5)
    return m.double().eval()


def x_batch(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def full_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, K, D] per-example Jacobians via torch.autograd.functional.jacobian, one example at a time."""
    rows = []
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)).squeeze(0), x[i])
        rows.append(J.flatten(1))
    return torch.stack(rows)


@pytest.mark.parametrize("norm,q", [("linf", 1), ("l2", 2)])
def test_exact_norms_match_autograd_jacobian(norm: str, q: int) -> None:
    model, x = tiny_supernet(), x_batch()
    J = full_jacobian(model, x)
    expected = J.norm(p=q, dim=2)
    got = jacobian_norms(model, x, norm, create_graph=False)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    R = jacobian_metric(model, x, 0.1, norm)
    torch.testing.assert_close(R, -(0.1 / J.shape[1]) * expected.sum(1).mean())
    surrogate = J.square().sum((1, 2)) if q == 2 else J.norm(dim=1).sum(1)
    torch.testing.assert_close(exact_surrogate(model, x, norm), surrogate)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_estimator_mean_within_confidence_interval(norm: str) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(192, 10)).double()
    x = x_batch(seed=3)
    exact = exact_surrogate(model, x, norm)
    n = 600
    s = projection_samples(model, x, norm, n_proj=n, create_graph=False, generator=torch.Generator().manual_seed(0))
    mean, half = s.mean(0), 4.5 * s.std(0) / math.sqrt(n)  # ~ 1e-5 two-sided false-alarm rate per example
    assert ((mean - exact).abs() <= half).all(), (mean, exact, half)
    # the surrogate brackets the exact sum of per-class norms within sqrt(K)
    K = 10
    total = jacobian_norms(model, x, norm, create_graph=False).sum(1)
    S = exact.sqrt() if norm == "l2" else exact
    assert (S <= total * (1 + 1e-9)).all() and (total <= math.sqrt(K) * S * (1 + 1e-9)).all()
    est = projected_jacobian_norm(model, x, norm, n_proj=4, create_graph=False)
    assert est.shape == (x.shape[0],) and torch.isfinite(est).all()


@pytest.mark.parametrize("norm,projections", [("linf", 0), ("l2", 0), ("l2", 3)])
def test_jacobian_metric_alpha_gradient_matches_finite_differences(norm: str, projections: int) -> None:
    model, x = tiny_supernet(4), x_batch(n=2, seed=5)

    def R() -> torch.Tensor:
        g = torch.Generator().manual_seed(11)  # common random numbers for the projected metric
        return jacobian_metric(model, x, 0.1, norm, projections, generator=g)

    (grad,) = torch.autograd.grad(R(), model.alphas_reduce)
    h = 1e-6
    for idx in [(0, 2), (4, 6)]:
        with torch.no_grad():
            model.alphas_reduce[idx] += h
            rp = R()
            model.alphas_reduce[idx] -= 2 * h
            rm = R()
            model.alphas_reduce[idx] += h
        fd = (rp - rm) / (2 * h)
        assert torch.isclose(grad[idx], fd, rtol=1e-4, atol=1e-8), (idx, grad[idx], fd)


def test_metric_gradient_reaches_weights() -> None:
    model, x = tiny_supernet(6), x_batch(n=2)
    R = jacobian_metric(model, x, 0.1, "linf")
    grads = torch.autograd.grad(R, [model.stem[0].weight, model.classifier.weight])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("seed", [1, 3])
@pytest.mark.parametrize("norm,projections", [("linf", 0), ("l2", 0), ("linf", 2), ("l2", 2)])
def test_finite_difference_metric_and_gradient_equal_double_backward(norm: str, projections: int, seed: int) -> None:
    """Danskin: the finite difference along the dual direction gives the same metric and the
    same alpha- and w-gradients as the double backward (float64), at any step: the moved
    points keep x's ReLU and max-pool choices (search_spaces/pattern.py). Without that, these
    nets' gradients at h = 1e-3 were 8-17 % off (a ReLU crossing within h adds O(1/h))."""
    model, x = tiny_supernet(seed), x_batch(n=8, seed=seed + 10)
    params = [model.alphas_reduce, model.stem[0].weight, model.classifier.weight]

    def R(fd_step: float) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        return jacobian_metric(model, x, 0.1, norm, projections, generator=g, fd_step=fd_step)

    exact = R(0.0)
    grads = torch.autograd.grad(exact, params)
    for h in (1e-3, 1.0):
        fd = R(h)
        torch.testing.assert_close(fd, exact, rtol=1e-12, atol=0)  # the value is g . u*, not the difference
        for a, b in zip(grads, torch.autograd.grad(fd, params), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


def test_finite_difference_metric_in_float32() -> None:
    """In fp32 at h = 1 the metric and its alpha-gradient equal the float64 double backward's
    to fp32 rounding (the value comes from the plain backward, the gradient from a difference
    that is exact in exact arithmetic)."""
    model, x = tiny_supernet(9), x_batch(n=8, seed=10)
    exact = jacobian_metric(model, x, 0.1, "linf")
    (g_exact,) = torch.autograd.grad(exact, [model.alphas_reduce])
    model32 = model.float()
    fd = jacobian_metric(model32, x.float(), 0.1, "linf", fd_step=1.0)
    (g_fd,) = torch.autograd.grad(fd, [model32.alphas_reduce])
    assert abs(fd.item() - exact.item()) <= 1e-5 * abs(exact.item())
    assert (g_fd.double() - g_exact).norm() <= 1e-5 * g_exact.norm()
