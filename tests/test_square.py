"""Properties of the Square Attack (distsearch/robust/square.py): threat-model membership, the
geometry of its proposals, query accounting, gradient-freeness, reproducibility, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distsearch.robust.apgd import APGD
from distsearch.robust.attack_base import l2_norm
from distsearch.robust.attacks import PGD, make_attack
from distsearch.robust.square import Square, p_schedule, pseudo_gaussian

try:
    from conftest_robust import cnn, test_set  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.conftest_robust import cnn, test_set  # noqa: F401

TOL = 1e-5


def rgb_model(seed: int) -> nn.Module:
    """A random 3-channel classifier on non-square 8 x 12 images, 5 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 96, 5))


def own_labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own predictions: every example is correct clean, so every one is attacked."""
    with torch.no_grad():
        return model(x).argmax(1)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), eps=st.floats(0.01, 2.0), norm=st.sampled_from(["linf", "l2"]))
def test_square_stays_in_ball_and_box(seed: int, eps: float, norm: str) -> None:
    model = rgb_model(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 8, 12, generator=g)
    x[0], x[1] = 0.0, 1.0  # corners of the box
    x_adv = Square(eps, norm=norm, n_queries=40, seed=seed)(model, x, own_labels(model, x))
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    delta = x_adv - x
    if norm == "linf":
        assert delta.abs().max() <= eps + TOL
    else:
        assert (l2_norm(delta) <= eps * (1 + TOL) + TOL).all()


def test_square_linf_init_is_vertical_stripes_and_every_point_a_vertex() -> None:
    """Inside the box's interior, the init sets every column of each channel to x ± ε, and
    every later square sets pixels to x ± ε again: every coordinate of the result is at ±ε."""
    model = rgb_model(0)
    x = 0.4 + 0.2 * torch.rand(8, 3, 8, 12)
    y = own_labels(model, x)
    delta = Square(0.05, n_queries=2)(model, x, y) - x  # the clean check and the init only
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, 0.05))
    assert (delta.sign() == delta[:, :, :1, :].sign()).all()  # one sign down each column
    delta = Square(0.05, n_queries=60)(model, x, y) - x
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, 0.05))
    assert (delta.sign() != delta[:, :, :1, :].sign()).any()  # squares were accepted


def test_square_l2_spends_exactly_eps() -> None:
    """Alg. 3 moves mass between squares and tops it up to the unused budget: inside the box's
    interior (no clipping) every init and every proposal has ‖x' − x‖₂ = ε exactly."""
    model = rgb_model(1)
    x = 0.4 + 0.2 * torch.rand(8, 3, 8, 12)
    y = own_labels(model, x)
    for n_queries in (2, 60):
        delta = Square(0.3, norm="l2", n_queries=n_queries)(model, x, y) - x
        torch.testing.assert_close(l2_norm(delta), torch.full((8,), 0.3), rtol=1e-5, atol=1e-6)
        assert delta.abs().max() < 0.3  # not a single pixel: spread over squares


def test_pseudo_gaussian_closed_form() -> None:
    """Eq. 3: at Chebyshev distance d from the centre, Σ_{k=d}^{n} (k+1)⁻² with n the largest distance."""
    b = pseudo_gaussian(5, 5)
    ring = {0: 1 + 1 / 4 + 1 / 9, 1: 1 / 4 + 1 / 9, 2: 1 / 9}
    assert b[2, 2] == pytest.approx(ring[0]) and b[1, 3] == pytest.approx(ring[1]) and b[0, 4] == pytest.approx(ring[2])
    assert b.shape == (5, 5) and torch.equal(b, b.T) and torch.equal(b, b.flip(0))
    assert pseudo_gaussian(2, 5).shape == (2, 5) and pseudo_gaussian(0, 5).numel() == 0


def test_p_schedule_halves_at_the_papers_iterations() -> None:
    assert p_schedule(10, 10_000, 0.8) == 0.8 and p_schedule(11, 10_000, 0.8) == 0.4
    assert p_schedule(500, 10_000, 0.8) == 0.8 / 8 and p_schedule(501, 10_000, 0.8) == 0.8 / 16
    assert p_schedule(9_999, 10_000, 0.8) == 0.8 / 512
    assert p_schedule(6, 5_000, 0.8) == 0.4  # rescaled: iteration 6 of 5 000 is 12 of 10 000
    assert p_schedule(6, 5_000, 0.8, rescale=False) == 0.8
    assert p_schedule(4_999, 5_000, 0.8, rescale=False) == 0.8 / 128


class Quantised(nn.Module):
    """The model on the input rounded to 1/16 steps, a gradient-masking "defence": rounding is
    flat almost everywhere, so the input gradient (kept in the graph by + 0·x) is exactly zero,
    while the decisions barely change."""

    def __init__(self, model: nn.Module, levels: int = 16):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * self.levels).detach() / self.levels + 0 * x)


@pytest.mark.parametrize("norm,eps,least", [("linf", 0.15, 0.3), ("l2", 2.0, 0.2)])
def test_square_breaks_a_model_with_masked_gradients(cnn, test_set, norm: str, eps: float, least: float) -> None:
    model = Quantised(cnn)
    x, y = test_set
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right][:64], y[right][:64]
    probe = x.clone().requires_grad_(True)
    model(probe).sum().backward()
    assert probe.grad.abs().max() == 0  # the gradient is masked

    def fooled(attack) -> float:
        x_adv = attack(model, x, y)
        with torch.no_grad():
            return float((model(x_adv).argmax(1) != y).float().mean())

    torch.manual_seed(0)
    for attack in (PGD(eps, steps=20, norm=norm), APGD(eps, steps=20, norm=norm, loss="dlr")):
        assert fooled(attack) <= 0.05  # only what the random start finds
    assert fooled(Square(eps, norm=norm, n_queries=300)) >= least


class Recorder(nn.Module):
    """Counts every row the attack queries; labels are all `label`, so it sees which rows are fooled."""

    def __init__(self, model: nn.Module, label: int):
        super().__init__()
        self.model, self.label, self.rows, self.fooled = model, label, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.rows.append(x.shape[0])
        self.fooled.append(int((out.argmax(1) != self.label).sum()))
        return out


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 2.0)])
def test_square_respects_the_budget_and_never_queries_a_broken_example(cnn, test_set, norm: str, eps: float) -> None:
    """One class only, so the recorder knows the labels: call 1 is the clean check of every
    example, call 2 the initial point of those right clean, and each later call has exactly the
    rows of the previous one minus those it fooled. Per example at most n_queries calls."""
    x, y = test_set
    label = 3
    x = x[y == label][:24]
    model = Recorder(cnn, label)
    n_queries = 80
    x_adv = Square(eps, norm=norm, n_queries=n_queries)(model, x, torch.full((len(x),), label))
    rows, fooled = model.rows, model.fooled
    assert rows[0] == len(x) and rows[1] == len(x) - fooled[0]
    assert all(rows[k + 1] == rows[k] - fooled[k] for k in range(1, len(rows) - 1))
    assert len(rows) <= n_queries  # each example is in at most one row per call
    assert rows[-1] > fooled[-1] and len(rows) == n_queries  # some survive: they got every query
    assert sum(fooled[1:]) > 0  # and some were broken along the way
    with torch.no_grad():
        wrong_clean = cnn(x).argmax(1) != label
    assert wrong_clean.any() and torch.equal(x_adv[wrong_clean], x[wrong_clean])  # returned as they are


def test_square_is_reproducible_and_leaves_the_global_rng_alone(cnn, test_set) -> None:
    x, y = test_set[0][:32], test_set[1][:32]
    state = torch.get_rng_state()
    a = Square(0.1, n_queries=50, seed=7)(cnn, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, Square(0.1, n_queries=50, seed=7)(cnn, x, y))
    assert not torch.equal(a, Square(0.1, n_queries=50, seed=8)(cnn, x, y))
    b = Square(1.0, norm="l2", n_queries=50, seed=7)(cnn, x, y)
    assert torch.equal(b, Square(1.0, norm="l2", n_queries=50, seed=7)(cnn, x, y))


def test_square_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="^eps: must be a finite number > 0, got 0"):
        make_attack("square", eps=0)
    with pytest.raises(ValueError, match="^n_queries: must be an integer >= 1, got 0"):
        make_attack("square", n_queries=0)
    with pytest.raises(ValueError, match="^n_queries: must be an integer >= 1, got 10.5"):
        make_attack("square", n_queries=10.5)
    for bad in (0, 0.0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"^p_init: must lie in \(0, 1\], got"):
            make_attack("square", p_init=bad)
    with pytest.raises(ValueError, match="^norm: must be one of linf, l2, got 'l1'"):
        make_attack("square", norm="l1")
    with pytest.raises(ValueError, match="^seed: must be an integer >= 0"):
        make_attack("square", seed=-1)
    with pytest.raises(ValueError, match="^queries: not a parameter of attack 'square'"):
        make_attack("square", queries=10)
    with pytest.raises(ValueError, match=r"^x: the square attack needs images \[N, C, H, W\]"):
        Square()(nn.Linear(4, 5), torch.rand(3, 4), torch.zeros(3, dtype=torch.long))
    assert isinstance(make_attack("square", eps=0.1, p_init=1), Square)


def test_evaluate_names_apgd_t_and_square(cnn, test_set, monkeypatch) -> None:
    """Both are named in the evaluate table; the default list (the CLI's too) has APGD-T but
    not the costly Square; a table with both (here with small budgets) has their rows and a
    worst row at most each."""
    from distsearch.cli import build_parser
    from distsearch.robust.apgd import APGDT
    from distsearch.robust.evaluate import DEFAULT_ATTACKS, EVAL_ATTACKS, game_table

    assert {"apgd-t", "square"} <= set(EVAL_ATTACKS) and set(DEFAULT_ATTACKS) <= set(EVAL_ATTACKS)
    assert "apgd-t" in DEFAULT_ATTACKS and "square" not in DEFAULT_ATTACKS
    assert build_parser().parse_args(["evaluate", "run"]).attacks is None  # cmd_evaluate: DEFAULT_ATTACKS
    assert isinstance(EVAL_ATTACKS["apgd-t"](0.1, "l2"), APGDT) and EVAL_ATTACKS["apgd-t"](0.1, "l2").norm == "l2"
    full = EVAL_ATTACKS["square"](0.1, "l2")
    assert isinstance(full, Square) and (full.norm, full.n_queries, full.p_init) == ("l2", 5000, 0.8)
    monkeypatch.setitem(EVAL_ATTACKS, "apgd-t", lambda eps, norm: APGDT(eps, steps=5, norm=norm, n_targets=3))
    monkeypatch.setitem(EVAL_ATTACKS, "square", lambda eps, norm: Square(eps, norm=norm, n_queries=40))
    x, y = test_set[0][:32], test_set[1][:32]
    rows = game_table(cnn, x, y, {"linf": [0.15]}, attacks=("apgd-t", "square"))
    acc = {r["attack"]: r["accuracy"] for r in rows}
    assert set(acc) == {"clean", "apgd-t", "square", "worst"}
    assert acc["worst"] <= min(acc["apgd-t"], acc["square"]) and max(acc["apgd-t"], acc["square"]) < acc["clean"]


def test_evaluate_skips_the_dlr_attacks_a_model_has_too_few_classes_for() -> None:
    """APGD-T needs 4 classes (APGD-DLR 3): on a 3-class model the default table warns and
    leaves APGD-T out instead of failing; the model's train mode is kept."""
    from distsearch.robust.evaluate import game_table

    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)
    )
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.warns(UserWarning, match="apgd-t needs at least 4 classes, the model has 3; skipped"):
        rows = game_table(model, x, y, {"linf": [0.05]}, attacks=("fgsm", "apgd-dlr", "apgd-t"))
    assert [r["attack"] for r in rows] == ["clean", "fgsm", "apgd-dlr", "worst"] and model.training
