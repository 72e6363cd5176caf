"""Properties of FAB and FAB-T (distsearch/robust/fab.py): the box-constrained projection against
LP / QP references, exact minimal distances on linear models, threat-model membership, more
targets only adding successes, validation, and the `autoattack` preset of evaluate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distsearch.cli import main
from distsearch.robust import evaluate
from distsearch.robust.attack_base import l2_norm
from distsearch.robust.attacks import make_attack
from distsearch.robust.fab import FAB, FABT, project_hyperplane_box

try:
    from conftest_robust import cnn, test_set  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.conftest_robust import cnn, test_set  # noqa: F401

TOL = 1e-5


def reference(z: np.ndarray, w: np.ndarray, b: float, norm: str) -> float:
    """The least ‖δ‖_p with w·(z + δ) + b = 0, z + δ ∈ [0, 1]^m, by SciPy: an LP in (δ, t) for L∞,
    SLSQP on ‖δ‖² for L2 (a convex QP: its local solution is the global one)."""
    from scipy.optimize import linprog, minimize

    m, bounds = len(z), [(-zi, 1 - zi) for zi in z]
    if norm == "linf":  # min t  s.t.  ±δ_i ≤ t
        a_ub = np.block([[np.eye(m), -np.ones((m, 1))], [-np.eye(m), -np.ones((m, 1))]])
        res = linprog(
            np.r_[np.zeros(m), 1.0],
            A_ub=a_ub,
            b_ub=np.zeros(2 * m),
            A_eq=np.r_[w, 0.0][None],
            b_eq=[-b - w @ z],
            bounds=[*bounds, (0, None)],
        )
        assert res.status == 0
        return float(res.fun)
    res = minimize(
        lambda v: v @ v,
        np.zeros(m),
        jac=lambda v: 2 * v,
        method="SLSQP",
        bounds=bounds,
        constraints=[{"type": "eq", "fun": lambda v: w @ (z + v) + b, "jac": lambda v: w}],
        options={"ftol": 1e-15, "maxiter": 500},
    )
    assert res.success
    return float(np.sqrt(res.fun))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_box_projection_is_feasible_and_no_longer_than_the_lp_qp_reference(norm: str) -> None:
    """On random small instances (some weights zero, some coordinates on the box's faces): the
    result stays in the box; where the hyperplane meets the box it lies on it with a norm no larger
    than SciPy's optimum; where it misses the box, the residual is the least the box allows."""
    rng = np.random.default_rng(0)
    feasible_seen = infeasible_seen = 0
    for m in range(1, 7):
        n = 25
        z, w = rng.random((n, m)), rng.normal(size=(n, m))
        w[rng.random((n, m)) < 0.15] = 0.0
        z[rng.random((n, m)) < 0.15] = rng.integers(0, 2)
        b = rng.normal(size=n) * m / 3
        delta = project_hyperplane_box(*(torch.from_numpy(a) for a in (z, w, b)), norm).numpy()
        for i in range(n):
            zi, wi, bi, di = z[i], w[i], b[i], delta[i]
            assert (zi + di >= 0).all() and (zi + di <= 1).all()
            low, high = np.minimum(wi, 0).sum() + bi, np.maximum(wi, 0).sum() + bi  # the box's residual range
            residual = wi @ (zi + di) + bi
            if low <= 0 <= high:
                feasible_seen += 1
                assert abs(residual) <= 1e-9
                size = np.abs(di).max(initial=0.0) if norm == "linf" else np.linalg.norm(di)
                assert size <= reference(zi, wi, bi, norm) + 1e-7
            else:
                infeasible_seen += 1
                assert abs(residual) == pytest.approx(min(abs(low), abs(high)), abs=1e-9)
    assert feasible_seen > 60 and infeasible_seen > 10


def test_box_projection_in_the_interior_is_the_unconstrained_one() -> None:
    """Far from the box's faces the projection is the textbook one: δ = −g·w/‖w‖₂² (L2) and
    δ = −g·sign(w)/‖w‖₁ (L∞), g = w·z + b."""
    torch.manual_seed(0)
    z = 0.4 + 0.2 * torch.rand(16, 30, dtype=torch.float64)
    w = torch.randn(16, 30, dtype=torch.float64)
    b = -(w * z).sum(1) + 0.05 * torch.randn(16, dtype=torch.float64)
    g = (w * z).sum(1) + b
    l2 = -g[:, None] * w / w.pow(2).sum(1, keepdim=True)
    linf = -g[:, None] * w.sign() / w.abs().sum(1, keepdim=True)
    torch.testing.assert_close(project_hyperplane_box(z, w, b, "l2"), l2)
    torch.testing.assert_close(project_hyperplane_box(z, w, b, "linf"), linf)


def linear_model(k: int, seed: int, sparse: bool = False) -> nn.Module:
    """Logits Wx + c, all nearly equal at the box's centre, so images near it lie near boundaries.
    `sparse`: every other class weighs only three pixels, so the L1 and L2 norms of the weight
    differences rank the boundaries differently (the dual norm matters)."""
    torch.manual_seed(seed)
    lin = nn.Linear(20, k).double()
    with torch.no_grad():
        if sparse:
            for c in range(1, k, 2):
                lin.weight[c] = 0.0
                lin.weight[c, torch.randperm(20)[:3]] = torch.randn(3, dtype=torch.float64)
        lin.bias.copy_(-0.5 * lin.weight.sum(1) + 0.02 * torch.randn(k, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), lin)


def closest_boundary(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    """min_{l≠y} |z_l − z_y| / ‖w_l − w_y‖_q (q the dual norm): the least p-distance to a
    misclassified point of a linear model, where the box does not interfere."""
    with torch.no_grad():
        z = model(x)
    weight = model[1].weight.detach()
    gap = z - z.gather(1, y[:, None])
    dual = (weight[None] - weight[y][:, None]).norm(p=1 if norm == "linf" else 2, dim=2)
    d_star = (gap.abs() / dual).scatter(1, y[:, None], float("inf")).amin(1)
    assert d_star.max() < 0.3  # x in [0.4, 0.6]^m and |δ_i| ≤ d* < 0.3: the box stays out of the way
    return d_star


def p_dist(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    return (a - b).flatten(1).norm(p=float("inf") if norm == "linf" else 2, dim=1)


def paper_recursion(steps: int, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9) -> float:
    """The least distance FAB keeps, in units of d*, when every iterate lies on the segment from x to
    its projection onto a single hyperplane (a binary linear model, the box inactive): at
    x_k = x + r·δ_o, δ_k = (1 − r)·δ_o, so ‖δ_k‖ / ‖δ_o‖ = |1 − r|, and the update is one-dimensional."""
    r, best = 0.0, math.inf
    for _ in range(steps):
        alpha = min(abs(1 - r) / (abs(1 - r) + 1), alpha_max)
        r = (1 - alpha) * (r + eta * (1 - r)) + alpha * eta
        if r > 1:  # misclassified: kept if closer, then the backward step
            best, r = min(best, r), beta * r
    return best


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_follows_the_papers_steps_on_a_binary_linear_model(norm: str) -> None:
    """Two classes, logits linear in x: the closest misclassified point lies at d* = |z_1 − z_0| /
    ‖w_1 − w_0‖_q, and FAB's iterates (α, η, β as in the paper) reach d* · 1.00521 (the overshoot's
    fixed point), exactly as the one-dimensional recursion does; FAB-T (one target) is the same."""
    model = linear_model(2, seed=2)
    x = 0.4 + 0.2 * torch.rand(24, 1, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    d_star = closest_boundary(model, x, y, norm)
    for steps in (1, 2, 20):
        for attack in (FAB(norm=norm, steps=steps), FABT(norm=norm, steps=steps)):
            x_adv = attack(model, x, y)
            assert (model(x_adv).argmax(1) != y).all()
            ratio = p_dist(x_adv, x, norm) / d_star
            torch.testing.assert_close(ratio, torch.full_like(ratio, paper_recursion(steps)), rtol=1e-9, atol=0)
    assert paper_recursion(20) == pytest.approx(1.0052133, abs=1e-7)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_finds_the_closest_of_several_linear_boundaries(norm: str) -> None:
    """Six classes, logits linear in x: the misclassified region is the union of the half-spaces
    z_l ≥ z_y, so the least distance is the smallest d_l (in the norm's dual). Untargeted FAB
    linearises towards the closest boundary, and FAB-T over all K − 1 targets keeps the closest
    run: both reach it (up to the 0.5 % overshoot), never closer; one target alone cannot beat it."""
    model = linear_model(6, seed=6, sparse=True)
    x = 0.4 + 0.2 * torch.rand(48, 1, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    d_star = closest_boundary(model, x, y, norm)
    for attack in (FAB(norm=norm, steps=20), FABT(norm=norm, steps=20, n_targets=5)):
        x_adv = attack(model, x, y)
        d = p_dist(x_adv, x, norm)
        assert (model(x_adv).argmax(1) != y).all()
        assert (d >= d_star * (1 - 1e-9)).all() and (d <= d_star * 1.01).all()
    one = FABT(norm=norm, steps=20, n_targets=1)(model, x, y)
    assert (p_dist(one, x, norm) >= d_star * (1 - 1e-9)).all()


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5))


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    eps=st.floats(0.01, 2.0),
    norm=st.sampled_from(["linf", "l2"]),
    targeted=st.booleans(),
    restarts=st.integers(1, 2),
)
def test_fab_stays_in_box_and_within_eps(seed: int, eps: float, norm: str, targeted: bool, restarts: int) -> None:
    """In the box; with ε, every example is returned either untouched or misclassified within ε
    (a point found beyond ε is rejected, not projected)."""
    model = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 8, 8, generator=g)
    x[0], x[1] = 0.0, 1.0  # corners of the box
    y = torch.randint(5, (6,), generator=g)
    x_adv = FAB(eps, norm=norm, steps=8, restarts=restarts, targeted=targeted, n_targets=2)(model, x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else l2_norm(delta)
    assert (size <= eps * (1 + TOL) + TOL).all()
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    assert (fooled | (size == 0)).all()


def correct_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return x[ok][:n], y[ok][:n]


def test_fab_t_more_targets_only_add_successes(cnn, test_set) -> None:
    """Each target's run is deterministic (no restarts) and later targets only see the examples
    still standing: more targets only add successes within ε; more than K − 1 is K − 1. Without ε
    every target runs on every example and the distance kept is the least: it only shrinks."""
    x, y = correct_subset(cnn, *test_set, 64)
    fooled, dist = {}, {}
    for k in (1, 3, 9, 50):
        x_adv = FABT(2.0, norm="l2", steps=8, n_targets=k)(cnn, x, y)
        with torch.no_grad():
            fooled[k] = cnn(x_adv).argmax(1) != y
        assert (l2_norm(x_adv - x) <= 2.0 + TOL).all()
    assert (fooled[3] >= fooled[1]).all() and fooled[3].sum() > fooled[1].sum() > 0
    assert (fooled[9] >= fooled[3]).all() and torch.equal(fooled[50], fooled[9])
    x, y = x[:16], y[:16]
    for k in (1, 2):
        x_adv = FABT(norm="l2", steps=8, n_targets=k)(cnn, x, y)
        with torch.no_grad():
            dist[k] = torch.where(cnn(x_adv).argmax(1) != y, l2_norm(x_adv - x), torch.inf)
    assert (dist[2] <= dist[1]).all() and (dist[2] < dist[1]).any() and dist[2].isfinite().all()


class Counter(nn.Module):
    """Counts the rows of every forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.model(x)


def test_fab_spends_nothing_on_examples_broken_within_eps() -> None:
    """With ε, an example leaves its run once a point within ε is found, and later targets and
    restarts see only the examples still standing: at a budget where the first target's run breaks
    every example, three targets and two restarts cost what one target costs, far below
    steps × examples; without ε every target runs on every example for every step."""
    model = linear_model(6, seed=6)
    x = 0.4 + 0.2 * torch.rand(16, 1, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    rows = {}
    for n_targets, restarts, eps in ((1, 1, 1.0), (3, 2, 1.0), (3, 1, None)):
        counter = Counter(model)
        x_adv = FABT(eps, norm="l2", steps=30, n_targets=n_targets, restarts=restarts)(counter, x, y)
        assert (model(x_adv).argmax(1) != y).all()
        rows[n_targets, restarts, eps] = counter.rows
    assert rows[3, 2, 1.0] == rows[1, 1, 1.0] < 16 * 30 / 4
    assert rows[3, 1, None] == 16 + 3 * 30 * 2 * 16  # the clean pass; per step a linearisation and a check


def test_fab_needs_two_classes_and_names_its_fields() -> None:
    x = torch.rand(4, 1, 8, 8)
    one = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    with pytest.raises(ValueError, match="^model: FAB needs at least 2 classes, the model has 1"):
        FABT(0.1, steps=2)(one, x, torch.zeros(4, dtype=torch.long))
    two = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    FABT(0.1, steps=2)(two, x, torch.randint(2, (4,)))  # K − 1 = 1 target: runs
    for kwargs, field in [
        ({"eps": 0.0}, "eps"),
        ({"norm": "l1"}, "norm"),
        ({"steps": 0}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"n_targets": 0}, "n_targets"),
        ({"targeted": "yes"}, "targeted"),
        ({"alpha_max": 1.5}, "alpha_max"),
        ({"eta": 0.9}, "eta"),
        ({"beta": 0.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
    ]:
        with pytest.raises(ValueError, match=f"^{field}: must"):
            make_attack("fab", **kwargs)
    with pytest.raises(ValueError, match="^targeted: not a parameter of attack 'fab-t'"):
        make_attack("fab-t", targeted=False)
    fab_t = make_attack("fab-t")
    assert fab_t.targeted and fab_t.n_targets == 9 and fab_t.steps == 100 and fab_t.eps is None
    assert (fab_t.alpha_max, fab_t.eta, fab_t.beta) == (0.1, 1.05, 0.9)
    assert not make_attack("fab").targeted


def test_autoattack_preset_expands_and_mixes() -> None:
    assert evaluate.expand_attacks(["autoattack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    mixed = evaluate.expand_attacks(["fgsm", "autoattack", "apgd-ce"])
    assert mixed == ["fgsm", "apgd-ce", "apgd-t", "fab-t", "square"]  # in order, each once
    with pytest.raises(ValueError, match="^attacks: unknown attack 'nope'; choose from .*fab-t.*autoattack"):
        evaluate.expand_attacks(["fgsm", "nope"])
    fab_t = evaluate.EVAL_ATTACKS["fab-t"](0.5, "l2")
    assert isinstance(fab_t, FABT) and (fab_t.eps, fab_t.norm, fab_t.steps, fab_t.n_targets) == (0.5, "l2", 100, 9)
    assert "fab-t" not in evaluate.DEFAULT_ATTACKS


def test_autoattack_table_has_its_rows_and_the_worst_is_below_each(cnn, test_set, monkeypatch) -> None:
    """The preset's four rows per budget, then `worst`, at most each of them (cheaper budgets
    than the real ones, same attacks)."""
    from distsearch.robust.apgd import APGD, APGDT
    from distsearch.robust.square import Square

    cheap = {
        "apgd-ce": lambda eps, norm: APGD(eps, steps=10, norm=norm),
        "apgd-t": lambda eps, norm: APGDT(eps, steps=10, norm=norm, n_targets=3),
        "fab-t": lambda eps, norm: FABT(eps, steps=10, norm=norm, n_targets=3),
        "square": lambda eps, norm: Square(eps, norm=norm, n_queries=100),
    }
    for name, factory in cheap.items():
        monkeypatch.setitem(evaluate.EVAL_ATTACKS, name, factory)
    x, y = test_set[0][:40], test_set[1][:40]
    rows = evaluate.game_table(cnn, x, y, {"linf": [0.1]}, attacks=["autoattack"])
    assert [r["attack"] for r in rows] == ["clean", "apgd-ce", "apgd-t", "fab-t", "square", "worst"]
    acc = {r["attack"]: r["accuracy"] for r in rows}
    assert all(acc["worst"] <= acc[a] <= acc["clean"] for a in cheap)
    assert acc["worst"] < acc["clean"]


def test_cli_accepts_autoattack_and_fab(tmp_path, capsys) -> None:
    """Names are checked before the run is read: a bad one is named, good ones get as far as the
    missing run."""
    nowhere = str(tmp_path / "nothing")
    assert main(["evaluate", nowhere, "--attacks", "fgsm", "magic"]) == 2
    assert "--attacks: unknown attack 'magic'" in capsys.readouterr().err
    for argv in (["evaluate", nowhere, "--attacks", "fgsm", "autoattack"], ["attack", nowhere, "--attack", "fab-t"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "no run" in err and "unknown attack" not in err
