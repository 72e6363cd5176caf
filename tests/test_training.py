"""Properties of the adversarial-training strategies (distsearch/robust/training*.py): counted
passes match each method's definition, every update clipped to grad_clip, FreeAT's budget
rule, exact resume, FreeLB's shared dropout mask, no gradient outside the optimizer, and
robustness gained on mnist5k."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distsearch.robust.attacks import PGD
from distsearch.robust.evaluate import accuracy
from distsearch.robust.models import build_model
from distsearch.robust.training import STRATEGIES, fit, make_strategy

try:
    from conftest_robust import EPS_L2, EPS_LINF, L2_STRATEGIES, STRATEGY_KWARGS, mnist, trained_mlp
except ImportError:  # tests/ imported as a package
    from tests.conftest_robust import (
        EPS_L2,
        EPS_LINF,
        L2_STRATEGIES,
        STRATEGY_KWARGS,
        # noqa: F401
        mnist,
        trained_mlp,
    )

# (forward, backward) passes of one step, by definition, for the kwargs below
EXPECTED = {
    "standard": ({}, 1, 1),
    "fgsm": ({}, 2, 2),  # clean pass (∇θ and ∇x together) + adversarial pass
    "fgsm_rs": ({}, 2, 2),  # one attack step + the training pass
    "fgm": ({}, 2, 2),
    "pgd": ({"steps": 4}, 5, 5),  # k attack steps + 1
    "free": ({"replays": 3}, 3, 3),  # m replays, one backward each
    "yopo": ({"m": 3, "n": 2}, 3, 3),  # m full passes (+ m·n first-layer passes, below)
    "freelb": ({"steps": 4}, 4, 4),  # K ascent steps
    "trades": ({"steps": 3}, 6, 5),  # f(x) for p, K steps, f(x) and f(x'); one backward through both
}


def tiny_batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(10, (n,), generator=g)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", 1, 10, hidden=(32,))


def test_registry_covers_the_issue() -> None:
    assert set(STRATEGIES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counted_passes_match_definition(name: str) -> None:
    kwargs, fwd, bwd = EXPECTED[name]
    model, (x, y) = mlp(), tiny_batch()
    steps = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.register_step_post_hook(lambda *a: steps.append(1))
    metrics = make_strategy(name, **kwargs).step(model, x, y, opt)
    assert int(metrics["forward_passes"]) == fwd and int(metrics["backward_passes"]) == bwd
    if name == "yopo":
        assert int(metrics["first_layer_passes"]) == 3 * 2
    assert len(steps) == (3 if name == "free" else 1)  # FreeAT updates θ on every replay
    for key in ("loss", "acc"):
        assert metrics[key].dim() == 0 and not metrics[key].requires_grad


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_grad_clip_bounds_every_update(name: str) -> None:
    """With grad_clip = c (as a search's optim.grad_clip sets it) every optimizer step moves
    plain SGD (lr 1) by at most c; without it the same step moves further (the control)."""
    kwargs = EXPECTED[name][0]
    moves = {}
    for clip in (1e-3, None):
        model, (x, y) = mlp(), tiny_batch()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        params = list(model.parameters())
        steps: list[float] = []
        before = [p.detach().clone() for p in params]

        def moved(*_: object, before: list[torch.Tensor] = before, params=params, steps=steps) -> None:
            steps.append(float(torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]).norm()))
            for b, p in zip(before, params):
                b.copy_(p.detach())

        opt.register_step_post_hook(moved)
        strategy = make_strategy(name, **kwargs)
        strategy.grad_clip = clip
        strategy.step(model, x, y, opt)
        moves[clip] = steps
    assert len(moves[1e-3]) == (3 if name == "free" else 1)
    assert max(moves[1e-3]) <= 1e-3 * (1 + 1e-5)
    assert min(moves[None]) > 2e-3


def test_searcher_gives_its_grad_clip_to_the_weight_strategy() -> None:
    from distsearch.search import DartsSearcher
    from search_spaces import Supernet

    strategy = make_strategy("fgsm_rs", eps=0.1)
    DartsSearcher(Supernet(1, 3, C=2, layers=2, nodes=2), epochs=1, grad_clip=0.5, weight_strategy=strategy)
    assert strategy.grad_clip == 0.5


def test_free_over_epochs_div_m_matches_standard_passes() -> None:
    d = mnist()
    x, y, m, epochs = d.x_train[:256], d.y_train[:256], 4, 4
    totals = {}
    for name, kw, ep in (("standard", {}, epochs), ("free", {"replays": m, "eps": 0.1}, epochs // m)):
        model = mlp()
        steps = []
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        opt.register_step_post_hook(lambda *a, s=steps: s.append(1))
        totals[name] = fit(model, make_strategy(name, **kw), x, y, ep, opt, batch_size=64)
        totals[name]["optimizer_steps"] = len(steps)
    for key in ("forward_passes", "backward_passes", "optimizer_steps"):
        assert totals["standard"][key] == totals["free"][key] > 0


def test_free_resume_is_exact() -> None:
    (x1, y1), (x2, y2) = tiny_batch(16), tiny_batch(12)  # the second batch is smaller: δ is cut to size

    def run(model, opt, strategy, batches):
        for xb, yb in batches:
            strategy.step(model, xb, yb, opt)

    model, strat = mlp(), make_strategy("free", eps=0.1, replays=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run(model, opt, strat, [(x1, y1)])
    assert strat.state_dict()["delta"].abs().sum() > 0  # δ is carried
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), strat.state_dict()))
    run(model, opt, strat, [(x2, y2)])

    model2, strat2 = mlp(), make_strategy("free", eps=0.1, replays=2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    strat2.load_state_dict(saved[2])
    run(model2, opt2, strat2, [(x2, y2)])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(strat.state_dict()["delta"], strat2.state_dict()["delta"])


def test_freelb_uses_one_dropout_mask_across_ascent_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.Dropout(0.5), nn.ReLU(), nn.Linear(64, 10))
    masks = []
    model[2].register_forward_hook(lambda m, inp, out: masks.append((out == 0) & (inp[0] != 0)))
    x, y = tiny_batch()
    make_strategy("freelb", steps=3).step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.01))
    assert len(masks) == 3 and masks[0].any()
    assert all(torch.equal(masks[0], m) for m in masks[1:])


class WithArchWeights(nn.Module):
    """A stand-in for a supernet: an extra parameter used in forward but absent from the optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.first_layer = self.net.first_layer
        self.alpha = nn.Parameter(torch.ones(10))

    def forward_rest(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.forward_rest(z) * self.alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rest(self.first_layer(x))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_only_optimizer_params_get_gradients(name: str) -> None:
    model, (x, y) = WithArchWeights(), tiny_batch()
    opt = torch.optim.SGD(model.net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.net.parameters()]
    model.train()
    make_strategy(name, **EXPECTED[name][0]).step(model, x, y, opt)
    assert model.alpha.grad is None and torch.equal(model.alpha, torch.ones(10))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net.parameters()))
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_yopo_needs_first_layer_and_bad_arguments_are_named() -> None:
    model, (x, y) = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), tiny_batch()
    with pytest.raises(ValueError, match="first_layer"):
        make_strategy("yopo").step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="^strategy: unknown name 'madry'"):
        make_strategy("madry")
    with pytest.raises(ValueError, match="^replays: not a parameter of strategy 'pgd'"):
        make_strategy("pgd", replays=3)
    with pytest.raises(ValueError, match="^eps: must be"):
        make_strategy("free", eps=0)
    with pytest.raises(ValueError, match="^alpha: the clean-loss weight"):
        make_strategy("fgsm", alpha=1.5)


MARGIN = 10.0  # percentage points of PGD-20 accuracy over standard training


def robust_accuracy(model: nn.Module, norm: str) -> float:
    d = mnist()
    torch.manual_seed(0)
    eps = EPS_L2 if norm == "l2" else EPS_LINF
    return accuracy(model, d.x_test[:500], d.y_test[:500], PGD(eps, steps=20, norm=norm))


@pytest.mark.parametrize("name", sorted(set(STRATEGY_KWARGS) - {"standard"}))
def test_strategy_raises_pgd20_robust_accuracy(name: str) -> None:
    """Each strategy, 4 epochs on 3,000 mnist5k images (an MLP), beats standard training's PGD-20
    accuracy by MARGIN points at ε = 0.1 (L∞), or ε = 1.5 (L2) for the L2 methods FGM and FreeLB."""
    norm = "l2" if name in L2_STRATEGIES else "linf"
    base = robust_accuracy(trained_mlp("standard"), norm)
    robust = robust_accuracy(trained_mlp(name), norm)
    assert robust >= base + MARGIN, f"{name}: PGD-20 {robust:.1f}% vs standard {base:.1f}%"
    d = mnist()
    assert accuracy(trained_mlp(name), d.x_test[:500], d.y_test[:500]) > 75.0  # still a classifier
