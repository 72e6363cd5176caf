"""Soundness and tightness of the certified bounds (robust/bounds*.py) on small random nets,
tiny supernets and derived networks: sampled and PGD-found perturbations stay inside the
bounds, eps = 0 gives f(x), linear bounds are never looser than IBP, no PGD succeeds inside
a certified radius, and the certified margin's alpha-gradient matches finite differences."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distsearch.robust.bounds import certified_metric, certified_radius, margin_bounds, spec_bounds
from distsearch.robust.models import build_model
from search_spaces import Genotype, Network, Supernet

TOL = 1e-9
GENO = Genotype(
    normal=(("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=(2, 3),
    reduce=(("avg_pool_3x3", 0), ("skip_connect", 1), ("sep_conv_5x5", 2), ("max_pool_3x3", 0)),
    reduce_concat=(2, 3),
)


def _randomise_bn(model: nn.Module, g: torch.Generator) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.double().eval()


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "seq":
        m = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.AvgPool2d(3, 1, 1, count_include_pad=False),
            nn.Flatten(),
            nn.Linear(64, 10),
            nn.ReLU(),
            nn.Linear(10, 5),
        )
    elif kind == "linear4d":  # an nn.Linear on the last axis of a 4-D activation, as torch applies it
        m = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.Linear(8, 6),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * 8 * 6, 5),
        )
    elif kind == "supernet":
        m = Supernet(in_channels=1, num_classes=5, C=4, layers=3, nodes=3)  # a normal cell, then two reduce
        with torch.no_grad():
            m.alphas_normal.normal_(generator=g)
            m.alphas_reduce.normal_(generator=g)
    elif kind in ("small_cnn", "mlp"):  # robust/models.py: first_layer, then the rest
        kw = {"width": 3, "hidden": 12} if kind == "small_cnn" else {"image_size": 8, "hidden": (12, 10)}
        m = build_model(kind, 1, 5, **kw)
    else:
        m = Network(GENO, in_channels=1, num_classes=5, C=4, layers=3)
    return _randomise_bn(m, g)


def inputs(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _col(e: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(e, dtype=x.dtype).expand(x.shape[0]).reshape(-1, 1, 1, 1)


def project(delta: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float, norm: str) -> torch.Tensor:
    e = _col(eps, x)
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, e), -e)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * (e / n).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    objective,
    eps: torch.Tensor | float,
    norm: str,
    steps: int = 10,
    restarts: int = 1,
    seed: int = 0,
) -> torch.Tensor:
    """Maximise objective(f(x + delta)) per example (eps: scalar or per example); returns the
    best x + delta found over the restarts (the first start is x itself)."""
    g = torch.Generator().manual_seed(seed)
    e = _col(eps, x)
    best_x, best = x.clone(), objective(model(x)).detach()
    for _ in range(restarts):
        delta = project((torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * e, x, eps, norm)
        for _ in range(steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(model(x + delta)).sum(), delta)
            with torch.no_grad():
                if norm == "linf":
                    step = grad.sign() * e / 4
                else:
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * e / 4
                delta = project(delta + step, x, eps, norm)
                val = objective(model(x + delta))
                better = val > best
                best = torch.where(better, val, best)
                best_x[better] = (x + delta)[better]
    return best_x


def margin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_y - max_{j != y} f_j per example."""
    return out.gather(1, y[:, None]).squeeze(1) - out.scatter(1, y[:, None], float("-inf")).max(1).values


def sample_ball(x: torch.Tensor, eps: float, norm: str, g: torch.Generator, n: int) -> torch.Tensor:
    """n points per example in the ball (L-inf: many on corners), stacked [n * B, ...]."""
    x = x.repeat(n, 1, 1, 1)
    d = torch.randn(x.shape, generator=g, dtype=x.dtype)
    if norm == "linf":
        d = torch.where(torch.rand(x.shape, generator=g, dtype=x.dtype) < 0.5, d.sign(), 2 * torch.rand_like(d) - 1)
        d = d * eps
    else:
        r = torch.rand(x.shape[0], 1, 1, 1, generator=g, dtype=x.dtype) ** 0.25
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * r
    return x + project(d, x, eps, norm)


@pytest.mark.parametrize("kind", ["seq", "supernet", "network", "small_cnn", "mlp", "linear4d"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.02), ("l2", 0.1)])
def test_bounds_contain_sampled_and_pgd_outputs(kind: str, norm: str, eps: float) -> None:
    model, x = make_model(kind), inputs(n=4)
    with torch.no_grad():
        f0 = model(x)
        xs = sample_ball(x, eps, norm, torch.Generator().manual_seed(2), n=8)
        fs = model(xs).view(8, *f0.shape)
    y = f0.argmax(1)
    # PGD points: one logit pushed up and down, and the margin pushed down (with a restart)
    attacks = [(k, pgd(model, x, lambda f, k=k, s=s: s * f[:, k], eps, norm, steps=5)) for k in (0, 3) for s in (1, -1)]
    x_marg = pgd(model, x, lambda f: -margin(f, y), eps, norm, steps=5, restarts=2)
    with torch.no_grad():
        f_att = [(k, model(xa)) for k, xa in attacks]
        f_marg = model(x_marg)
    for method in ("ibp", "crown"):
        lo0, up0 = spec_bounds(model, x, 0.0, norm, method)
        assert torch.allclose(lo0, f0, atol=1e-10) and torch.allclose(up0, f0, atol=1e-10)  # exact at eps = 0
        lo, up = spec_bounds(model, x, eps, norm, method)
        assert (fs >= lo - TOL).all() and (fs <= up + TOL).all(), method
        for k, f in f_att:
            assert (f[:, k] >= lo[:, k] - TOL).all() and (f[:, k] <= up[:, k] + TOL).all(), method
        mb = margin_bounds(model, x, y, eps, norm, method).min(1).values
        assert (mb <= margin(f_marg, y) + TOL).all() and (mb <= margin(f0, y) + TOL).all()


@pytest.mark.parametrize("kind", ["seq", "supernet", "network", "small_cnn", "mlp", "linear4d"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.2)])
def test_linear_bounds_never_looser_than_ibp(kind: str, norm: str, eps: float) -> None:
    model, x = make_model(kind, seed=3), inputs(seed=4)
    li, ui = spec_bounds(model, x, eps, norm, "ibp")
    lc, uc = spec_bounds(model, x, eps, norm, "crown")
    assert (lc >= li - TOL).all() and (uc <= ui + TOL).all()  # by construction (the max / min with IBP)
    assert (uc - lc).mean() < (ui - li).mean()  # what the linear pass adds: strictly tighter on average


@pytest.mark.parametrize("kind", ["supernet", "network"])
def test_linear_pass_alone_is_the_first_order_expansion_at_tiny_eps(kind: str) -> None:
    """At eps 1e-7 no ReLU is unstable, so CROWN's linear pass (without the max with IBP that
    spec_bounds takes) is exact: its coefficients are the Jacobian and its lower bound is
    f_k(x) - eps ||J_k||_q (q the dual norm), through sep / dil / strided convs, avg pools, skips,
    factorised reduce and BN with random affine weights (no max pool: its upper line is a constant)."""
    from distsearch.robust.bounds import _concretize, _eps, input_box
    from distsearch.robust.bounds_ibp import Trace, head_of, ibp
    from distsearch.robust.bounds_linear import Back, back

    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    ops = ("none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    if kind == "supernet":
        m = Supernet(in_channels=2, num_classes=3, C=2, layers=3, nodes=2, stem_multiplier=2, ops=ops)
        with torch.no_grad():
            m.alphas_normal.normal_(generator=g)
            m.alphas_reduce.normal_(generator=g)
    else:
        no_pool = Genotype(
            normal=(("sep_conv_5x5", 0), ("avg_pool_3x3", 1), ("skip_connect", 0), ("dil_conv_5x5", 2)),
            normal_concat=(2, 3),
            reduce=(("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_3x3", 2), ("avg_pool_3x3", 0)),
            reduce_concat=(2, 3),
        )
        m = Network(no_pool, in_channels=2, num_classes=3, C=2, layers=3)
    for bn in (b for b in m.modules() if isinstance(b, nn.BatchNorm2d) and b.weight is not None):
        with torch.no_grad():
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=g))
    m = _randomise_bn(m, g)
    x = torch.rand(2, 2, 7, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    f = m(x)
    J = torch.stack([torch.autograd.grad(f[:, k].sum(), x, retain_graph=True)[0] for k in range(3)], 1)
    x, eps = x.detach(), 1e-7
    for norm, q in (("linf", 1), ("l2", 2)):
        trace = Trace()
        ibp(m, input_box(x, eps, norm, None), trace)
        assert not any(((lo < 0) & (up > 0)).any() for lo, up in trace.bounds.values()), "a ReLU is unstable"
        K = head_of(m).out_features
        st = Back(trace)
        A = back(m, torch.eye(K, dtype=x.dtype).expand(2, K, K), st)
        lower = _concretize(A, st.const, x, _eps(eps, x), norm, None, (2, K))
        assert torch.allclose(A, J, rtol=0, atol=1e-12)
        want = f.detach() - eps * J.flatten(2).norm(p=q, dim=2)
        assert torch.allclose(lower, want, rtol=0, atol=1e-7 * eps), norm  # f itself is exact to ~1e-16


def test_relu_chord_on_a_range_narrower_than_1e_12_stays_sound() -> None:
    """An unstable ReLU whose input range is narrower than 1e-12 (a tiny eps): its upper line
    must still pass through relu(up). A floor of 1e-12 on the range's width made the chord too
    flat, CROWN's bound (the max with IBP keeps the tighter, wrong one) certified a margin of
    +2e-14 where x + eps is misclassified."""
    from distsearch.robust.bounds import margin_lower_bound
    from distsearch.robust.certify import certified_accuracy

    m = nn.Sequential(nn.Flatten(), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)).double().eval()
    with torch.no_grad():
        m[1].weight.fill_(1.0)
        m[1].bias.fill_(-0.5)  # z = x - 0.5: unstable on [0.5 - eps, 0.5 + eps]
        m[3].weight.copy_(torch.tensor([[-1.0], [0.0]]))  # f0 - f1 = 1e-13 - relu(z)
        m[3].bias.copy_(torch.tensor([1e-13, 0.0]))
    x, y, eps = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64), torch.tensor([0]), 2e-13
    with torch.no_grad():
        worst = m(x + eps)
    true_margin = float(worst[0, 0] - worst[0, 1])
    assert true_margin < 0  # x + eps lies in the ball and is misclassified
    for method in ("ibp", "crown"):
        assert float(margin_lower_bound(m, x, y, eps, "linf", method).detach()) <= true_margin + 1e-20, method
    assert certified_accuracy(m, x, y, [eps], "linf", "crown") == [0.0]


@pytest.mark.parametrize("kind", ["seq", "network"])
def test_max_pool_relaxation_tighter_than_its_interval_bounds(kind: str, monkeypatch) -> None:
    """CROWN through a max pool (lower line z_j*, upper constant) against stopping the
    substitution at the pool's interval bounds, as the code did before: never looser, tighter on average."""
    from distsearch.robust import bounds_linear

    model, x = make_model(kind, seed=7), inputs(seed=8)
    lo_new, up_new = spec_bounds(model, x, 0.03, "linf", "crown")

    def interval(m, A, st):
        lo, up = st.trace.bounds[id(m)]
        st.add((A.clamp_min(0) * lo.unsqueeze(1) + A.clamp_max(0) * up.unsqueeze(1)).flatten(2).sum(-1))
        return None

    monkeypatch.setattr(bounds_linear, "_maxpool_back", interval)
    lo_old, up_old = spec_bounds(model, x, 0.03, "linf", "crown")
    assert (lo_new >= lo_old - 1e-9).all() and (up_new <= up_old + 1e-9).all()
    assert (up_new - lo_new).mean() < (up_old - lo_old).mean()


def test_no_pgd_succeeds_inside_certified_radius() -> None:
    model, x = make_model("network", seed=5), inputs(n=8, seed=6)
    with torch.no_grad():
        y = model(x).argmax(1)
    for norm in ("linf", "l2"):
        eps_max = 1.0 if norm == "linf" else 4.0
        r = certified_radius(model, x, y, norm, "crown", eps_max=eps_max, steps=10)
        assert (r > 0).all()
        assert (margin_bounds(model, x, y, r, norm, "crown").min(1).values > 0).all()
        # each example attacked at its own certified radius, 3 random restarts
        xa = pgd(model, x, lambda out: -margin(out, y), r, norm, steps=10, restarts=3)
        with torch.no_grad():
            assert (model(xa).argmax(1) == y).all()
        # CROWN-IBP dominates IBP at every eps, so its radius is no smaller (up to the bisection step)
        r_ibp = certified_radius(model, x, y, norm, "ibp", eps_max=eps_max, steps=10)
        assert (r_ibp <= r * 2 ** (20 / 2**10) + 1e-12).all()


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_certified_margin_alpha_gradient_matches_finite_differences(method: str) -> None:
    model, x = make_model("supernet", seed=7), inputs(n=4, seed=8)
    y = torch.tensor([0, 1, 2, 3])
    R = certified_metric(model, x, y, 0.01, "linf", method)
    (g,) = torch.autograd.grad(R, model.alphas_reduce)
    h = 1e-6
    for idx in [(0, 1), (4, 7)]:
        with torch.no_grad():
            model.alphas_reduce[idx] += h
            rp = certified_metric(model, x, y, 0.01, "linf", method)
            model.alphas_reduce[idx] -= 2 * h
            rm = certified_metric(model, x, y, 0.01, "linf", method)
            model.alphas_reduce[idx] += h
        fd = (rp - rm) / (2 * h)
        assert torch.isclose(g[idx], fd, rtol=1e-4, atol=1e-7), (idx, g[idx], fd)


@pytest.mark.parametrize("padding", ["same", "valid", 1])
def test_conv_string_padding_bounds_are_sound(padding) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=padding), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = inputs(n=3)
    model = model.double()
    model(x)  # materialise the lazy head
    with torch.no_grad():
        fs = model(sample_ball(x, 0.05, "linf", torch.Generator().manual_seed(1), n=8)).view(8, 3, 4)
    for method in ("ibp", "crown"):
        lo, up = spec_bounds(model, x, 0.05, "linf", method)
        assert (fs >= lo - TOL).all() and (fs <= up + TOL).all(), method


@pytest.mark.parametrize(
    "model,needle",
    [
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()), "padding_mode='reflect'"),
        (nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.Flatten()), "asymmetric"),
        (nn.Sequential(nn.Conv2d(1, 2, 1), nn.Tanh(), nn.Flatten()), "no bound propagation rule for Tanh"),
        (build_model("resnet18", 1, 5), "no bound propagation rule for SmallInputResNet"),
        (nn.Sequential(nn.MaxPool2d(2, return_indices=True), nn.Flatten()), "return_indices=True"),
        (nn.Sequential(nn.AvgPool2d(2, divisor_override=-1), nn.Flatten()), "divisor_override -1"),
    ],
    ids=["reflect", "same-even", "tanh", "resnet", "pool-indices", "negative-divisor"],
)
def test_unsupported_modules_are_refused_by_name(model: nn.Module, needle: str) -> None:
    """Non-zero padding modes would give unsound bounds: refused, like every op without a rule."""
    x = inputs(n=2).float()
    for method in ("ibp", "crown"):
        with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
            spec_bounds(model.eval(), x, 0.1, "linf", method)


def test_module_reused_at_two_sizes_is_refused() -> None:
    pool = nn.AvgPool2d(2)
    model = nn.Sequential(pool, pool, nn.Flatten()).double()
    with pytest.raises(ValueError, match="called on inputs of two sizes"):
        spec_bounds(model, inputs(n=2), 0.1, "linf", "crown")


def test_l2_ball_through_a_repeat_stays_sound() -> None:
    """Repeat copies the input, so the copy of an L2 ball of radius eps has radius eps*sqrt(2):
    the exact-L2 first-layer rule must not apply after it (it gave 1.141 where 1.2 is reached)."""
    from search_spaces.operations import Repeat

    conv = nn.Conv2d(2, 1, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    model = nn.Sequential(Repeat(2), conv, nn.Flatten())
    x = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    delta = torch.zeros_like(x)
    delta[0, 0, 0, 0] = 0.1  # ||delta||_2 = 0.1, unit 0 moves by 2 * 0.1
    with torch.no_grad():
        reached = model(x + delta)[0, 0]
    for method in ("ibp", "crown"):
        _, up = spec_bounds(model, x, 0.1, "l2", method)
        assert float(reached) == pytest.approx(1.2) and float(up[0, 0]) >= 1.2 - TOL, method


def test_certified_radius_relative_precision_over_orders_of_magnitude() -> None:
    """A linear two-class model's L2 radius at x_b + t * a / ||a|| (x_b on the boundary, a the
    margin's gradient) is exactly t (CROWN is exact on it, no box): the bisection finds radii
    from 1e-3 to 10 in a range of 28 (the L2 diameter of MNIST's box) from below within
    2^(20/2^12), where a linear bisection of [0, 28] in 12 steps resolves only 0.007."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 2).double()
    model = nn.Sequential(nn.Flatten(), lin)
    with torch.no_grad():
        a = lin.weight[0] - lin.weight[1]  # margin of class 0: a . x + c
        c = lin.bias[0] - lin.bias[1]
        x_b = torch.rand(16, dtype=torch.float64)
        x_b = x_b - (a @ x_b + c) / a.square().sum() * a  # on the boundary
        t = torch.logspace(-3, 1, 40, dtype=torch.float64)
        x = (x_b + t[:, None] * a / a.norm()).view(40, 1, 4, 4)
    y = torch.zeros(40, dtype=torch.long)
    r = certified_radius(model, x, y, "l2", "crown", eps_max=28.0, domain=None)
    assert (r <= t * (1 + 1e-9)).all()  # sound
    assert (r >= t / 2 ** (20 / 2**12)).all()  # and tight to the stated relative precision


class _Normalised(nn.Sequential):
    """A user's model: standardises its input inside an overridden forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - 0.1307) / 0.3081)


class _StandardisedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _ScaledConv(nn.Conv2d):  # forward inherited; the convolution it calls is not
    def _conv_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, 3 * w, b)


class _Flipped(Network):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x)


class _FlippedRest(Network):
    def forward_rest(self, z: torch.Tensor) -> torch.Tensor:
        return -super().forward_rest(z)


class _Built(nn.Sequential):  # construction only: bounded as the Sequential it is
    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 5))


def _hooked() -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 5))
    m[1].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    return m


def _patched() -> nn.Module:
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    m[1].forward = lambda z, lin=m[1]: torch.nn.functional.linear(5 * z, lin.weight, lin.bias)
    return m


def _flipped_small_cnn() -> nn.Module:
    m = build_model("small_cnn", 1, 5, width=3, hidden=12)
    cnn = type(m)
    m.__class__ = type("FlippedCNN", (cnn,), {"forward": lambda self, x: -cnn.forward(self, x)})
    return m


@pytest.mark.parametrize(
    "build,needle",
    [
        (lambda: _Normalised(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 5)), "_Normalised.forward"),
        (
            lambda: nn.Sequential(_StandardisedConv(1, 2, 3), nn.Flatten(), nn.Linear(72, 5)),
            "_StandardisedConv.forward",
        ),
        (lambda: nn.Sequential(_ScaledConv(1, 2, 3), nn.Flatten(), nn.Linear(72, 5)), "_ScaledConv._conv_forward"),
        (lambda: _Flipped(GENO, in_channels=1, num_classes=5, C=4, layers=3), "bounded as Network, but _Flipped"),
        (lambda: _FlippedRest(GENO, in_channels=1, num_classes=5, C=4, layers=3), "_FlippedRest.forward_rest"),
        (_flipped_small_cnn, "bounded as SmallCNN, but FlippedCNN.forward"),
        (_patched, "forward patched on the instance"),
        (_hooked, r"1 \(Linear\) has forward hooks"),
    ],
    ids=["sequential-forward", "conv-forward", "conv-inner", "network", "network-rest", "small-cnn", "patch", "hook"],
)
def test_modules_computing_something_else_are_refused(build, needle: str, monkeypatch) -> None:
    """A subclass that overrides a bounded class's forward, or a hook, changes what the module
    computes: bounding it as the parent class is unsound (checked: f(x) leaves the bounds)."""
    import distsearch.robust.bounds as bounds

    model = build().double().eval()
    x = inputs(n=4)
    for method in ("ibp", "crown"):
        with pytest.raises(ValueError, match=needle):
            spec_bounds(model, x, 0.01, "linf", method)
    monkeypatch.setattr(bounds, "check_model", lambda *a, **k: None)  # why it is refused:
    lo, up = spec_bounds(model, x, 0.01, "linf", "ibp")
    f = model(x)
    assert not ((lo <= f + TOL) & (f <= up + TOL)).all()  # the model's own output escapes


def test_subclasses_adding_only_construction_and_parametrised_weights_are_bounded() -> None:
    """What the check lets through is bounded soundly: a Sequential subclass with only __init__, and
    weights read through torch's parametrisations (weight norm, spectral norm)."""
    torch.manual_seed(0)
    norm = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 5))
    torch.nn.utils.parametrizations.weight_norm(norm[0])
    torch.nn.utils.parametrizations.spectral_norm(norm[3])
    x, g = inputs(n=4), torch.Generator().manual_seed(5)
    for model in (_Built().double().eval(), norm.double().eval()):
        for method in ("ibp", "crown"):
            lo, up = spec_bounds(model, x, 0.05, "linf", method)
            f = model(sample_ball(x, 0.05, "linf", g, 8))
            assert ((lo.repeat(8, 1) <= f + TOL) & (f <= up.repeat(8, 1) + TOL)).all()


@pytest.mark.parametrize("eps", [-0.1, float("nan"), torch.tensor(-0.1), torch.full((4,), float("nan"))])
def test_negative_or_nan_eps_is_refused(eps) -> None:
    """A negative eps made lo > hi and certified every example, misclassified ones too."""
    from distsearch.robust.certify import certified_accuracy

    model, x = make_model("seq"), inputs(n=4)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="eps: must be"):
        spec_bounds(model, x, eps)
    with pytest.raises(ValueError, match="eps: must be"):
        certified_accuracy(model, x, y, eps if isinstance(eps, torch.Tensor) else [eps])


def test_inputs_outside_the_domain_are_refused() -> None:
    """The ball is clipped to the domain: an x outside it is not in its own input set, so the
    'certificate' would not cover x itself; domain=None (no box) bounds it soundly."""
    model, x = make_model("seq"), inputs(n=4)
    with pytest.raises(ValueError, match=r"x: values in \[nan, nan\] lie outside"):  # NaN: no bound at all
        spec_bounds(model, torch.where(x > 0.5, float("nan"), x), 0.01, "linf", "crown")
    for bad in (x * 2, x - 0.5):
        with pytest.raises(ValueError, match=r"x: values in .* lie outside domain=\(0.0, 1.0\)"):
            spec_bounds(model, bad, 0.01, "linf", "crown")
        lo, up = spec_bounds(model, bad, 0.01, "linf", "crown", domain=None)
        f = model(bad)
        assert ((lo <= f + TOL) & (f <= up + TOL)).all()


def test_bounds_leave_batch_norm_statistics_and_modes_alone() -> None:
    """A model without a final Linear is run once to count its classes: in eval mode, so its
    BatchNorm running statistics do not move, and every module's mode is restored."""
    from distsearch.robust.certify import certified_accuracy

    model = nn.Sequential(nn.Conv2d(1, 5, 3), nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = inputs(n=4), torch.zeros(4, dtype=torch.long)
    margin_bounds(model, x, y, 0.01)
    assert certified_accuracy(model, x, y, 0.01) == certified_accuracy(model, x, y, [0.01])  # one number: a list of one
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model] == [True, False, True, True]


def test_rounding_never_certifies_a_misclassified_example(monkeypatch) -> None:
    """Bounds are not rounded outward: a float32 bound was seen 1-2 ulps of the logit scale above
    the forward's own margin at eps = 0, certifying misclassified examples. Here a bound rounded
    up by 3 ulps on an example the forward gets wrong by 1 ulp: certify refuses it, and still
    certifies an example classified right by a clear margin."""
    from distsearch.robust import bounds, certify

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 1.0]))
        model[1].bias[1] = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))  # f_1 one ulp below f_0
    x, y = torch.full((2, 1, 2, 2), 0.5), torch.tensor([1, 0])  # example 0: wrong by an ulp; 1: right by one
    ulp = torch.finfo(torch.float32).eps

    def rounded_up(model, x, y, eps, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        f = model(x)
        true = f.gather(1, y[:, None]).squeeze(1) - f.scatter(1, y[:, None], float("-inf")).max(1).values
        return true + 3 * ulp * f.abs().amax(1)

    for where in (bounds, certify):
        monkeypatch.setattr(where, "margin_lower_bound", rounded_up)
    assert certify.certified_accuracy(model, x[:1], y[:1], [0.0, 0.01]) == [0.0, 0.0]
    assert bounds.certified_radius(model, x[:1], y[:1]).tolist() == [0.0]
    right, slack = bounds.rounding_guard(model, x, y)
    assert right.tolist() == [False, False] and torch.allclose(slack, torch.full((2,), 100 * ulp))
    with torch.no_grad():
        model[1].bias[0] = 1.5  # example 1 now right by 0.5: certified, its radius eps_max
    assert certify.certified_accuracy(model, x[1:], y[1:], [0.0, 0.01]) == [1.0, 1.0]
    assert bounds.certified_radius(model, x[1:], y[1:]).tolist() == [1.0]
