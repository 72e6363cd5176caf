"""The DSRNA searcher (search/dsrna.py): every variant steps (first and second order) with
finite metrics; gamma = 0 reproduces DARTS bitwise; frozen BN leaves the model untouched;
exact resume; the config files validate and build it; the quickstart runs end to end
(shrunk); the certify tables and plot are written."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distsearch.config_file import load_config
from distsearch.robust.certify import certify_table, plot_certified_accuracy, write_csv, write_markdown
from distsearch.search import DartsSearcher, DsrnaSearcher
from distsearch.search.dsrna import capture_bn_stats, frozen_bn, running_stats
from search_spaces import Supernet
from search_spaces.operations import BatchNorm2d

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["quickstart_dsrna", "mnist_dsrna_cb", "cifar10_dsrna"]


def tiny(seed: int = 0) -> tuple[Supernet, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    net = Supernet(in_channels=1, num_classes=4, C=2, layers=3, nodes=2)  # a normal cell, then two reduce
    g = torch.Generator().manual_seed(seed + 1)
    batch = lambda: (torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
    return net, batch(), batch()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "variant,bound,order,proj",
    [
        ("jacobian", "ibp", "first", 0),
        ("jacobian", "ibp", "second", 2),
        ("certified", "ibp", "second", 0),
        ("certified", "crown", "first", 0),
        ("combined", "crown", "first", 1),
    ],
)
def test_steps_run_and_report_metrics(variant: str, bound: str, order: str, proj: int) -> None:
    net, tb, vb = tiny()
    alphas = [a.detach().clone() for a in net.arch_parameters()]
    s = DsrnaSearcher(net, epochs=2, order=order, variant=variant, bound=bound, projections=proj, eps=0.05)
    m = s.step(tb, vb)
    keys = {"jacobian": {"R_jac"}, "certified": {"R_cb"}, "combined": {"R_jac", "R_cb"}}[variant]
    assert keys <= m.keys() and {"val_loss", "arch_objective", "train_loss", "R"} <= m.keys()
    for k, v in m.items():
        assert isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0 and torch.isfinite(v), k
    if order == "first":  # second order reports L_val at the virtual step w'
        torch.testing.assert_close(m["arch_objective"], m["val_loss"] - 0.01 * m["R"])
    # alpha moved by a real gradient (Adam's weight decay alone would move it too), in both cells
    assert float(m["arch_nonfinite"]) == 0
    for a, b in zip(alphas, net.arch_parameters()):
        assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0
        assert not torch.equal(a, b)


@pytest.mark.parametrize("order", ["first", "second"])
def test_gamma_zero_equals_darts(order: str) -> None:
    net, tb, vb = tiny(1)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    darts = DartsSearcher(a, epochs=2, order=order)
    dsrna = DsrnaSearcher(b, epochs=2, order=order, variant="combined", bound="crown", gamma=0.0)
    for _ in range(2):
        md, ms = darts.step(tb, vb), dsrna.step(tb, vb)
    assert _same_state(a, b)  # alphas, weights and BN running statistics, bitwise
    assert torch.equal(md["val_loss"], ms["val_loss"])


@pytest.mark.parametrize("bn_stats,proj", [("running", 0), ("batch", 1)])
def test_finite_difference_jacobian_gives_the_double_backward_arch_gradient(bn_stats: str, proj: int) -> None:
    """The searcher's objective with jacobian_fd_step > 0 has the same value and alpha-gradient
    as with the double backward (float64, the same projection draws)."""
    net, _, (x, y) = tiny(3)
    net = net.double()
    x = x.double()
    grads, values = [], []
    for fd_step in (0.0, 1e-7):
        s = DsrnaSearcher(copy.deepcopy(net), epochs=2, projections=proj, bn_stats=bn_stats, jacobian_fd_step=fd_step)
        torch.manual_seed(5)  # the projection draws
        objective, metrics = s.arch_objective(x, y)
        grads.append(torch.autograd.grad(objective, s.model.arch_parameters(), allow_unused=True))
        values.append(metrics["R_jac"])
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=0)
    for a, b in zip(*grads, strict=True):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize(
    "variant,order,proj", [("jacobian", "first", 0), ("jacobian", "second", 2), ("combined", "first", 1)]
)
def test_fused_forward_equals_separate_forwards(variant: str, order: str, proj: int) -> None:
    """With finite differences and running statistics, L_val's train-mode forward shares one
    batch with the moved points (split_batch_norm): two steps land on the same alphas,
    weights, BN running statistics and metrics as separate forwards (float64), in one model
    forward fewer per objective."""
    net, tb, vb = tiny(6)
    net = net.double()
    tb, vb = (tb[0].double(), tb[1]), (vb[0].double(), vb[1])
    kw = dict(epochs=2, order=order, variant=variant, projections=proj, bound="crown", jacobian_fd_step=1e-6)
    runs = []
    for fused in (True, False):
        s = DsrnaSearcher(copy.deepcopy(net), **kw)
        assert s.fused
        s.fused = fused
        sizes: list[int] = []
        s.model.register_forward_pre_hook(lambda m, args, sizes=sizes: sizes.append(len(args[0])))
        torch.manual_seed(7)  # the projection draws
        metrics = [s.step(tb, vb) for _ in range(2)]
        runs.append((s, metrics, sizes))
    (fused, m_fused, sizes_fused), (separate, m_separate, sizes_separate) = runs
    sa, sb = fused.model.state_dict(), separate.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-9, atol=1e-12, msg=k)
    for a, b in zip(m_fused, m_separate):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12, msg=k)
    directions = proj or 4  # the exact norms move along one direction per class
    assert len(sizes_fused) < len(sizes_separate) and max(sizes_fused) == len(vb[0]) * (2 + directions)
    assert all(m.split is None for m in fused.model.modules() if hasattr(m, "split"))


@pytest.mark.parametrize("training", [True, False])
def test_split_batch_norm_is_two_batch_norms(training: bool) -> None:
    """A split BatchNorm gives the head's rows as the module's mode would (train mode: batch
    statistics, running ones updated) and the tail's frozen to the given statistics: values,
    input and scale gradients and running statistics as two separate calls (float64)."""
    torch.manual_seed(0)
    bn = BatchNorm2d(3, affine=False).double().train(training)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(7, 3, 4, 4, dtype=torch.double, requires_grad=True)
    scale = torch.rand(3, dtype=torch.double, requires_grad=True)
    probe = torch.randn(7, 3, 4, 4, dtype=torch.double)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    results = []
    for split in (True, False):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if split:
            bn.split = (3, mean.clone(), var.clone())
            out = bn(x, scale)
            bn.split = None
        else:
            tail = F.batch_norm(x[3:], mean.clone(), var.clone(), scale, None, False, 0.0, bn.eps)
            out = torch.cat([bn(x[:3], scale), tail])
        grads = torch.autograd.grad((out * probe).sum(), [x, scale])
        results.append((out.detach(), *grads, bn.running_mean.clone(), bn.running_var.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert training != torch.equal(results[0][3], mean)  # the head updates the running mean in train mode only


@pytest.mark.parametrize("variant,fd_step", [("jacobian", 0.0), ("combined", 1e-6), ("certified", 0.0)])
def test_arch_objective_gradient_matches_finite_differences(variant: str, fd_step: float) -> None:
    """The alpha-gradient the arch step takes equals central differences of the objective
    (float64, L2 norms: no kinks of |.| within the step): L_val's forward updates the running
    statistics in place while R's graph still holds the ones R read, so R must read a copy,
    or its gradient is silently wrong."""
    net, _, (x, y) = tiny(8)
    net, x = net.double(), x.double()
    kw = dict(epochs=2, variant=variant, norm="l2", jacobian_fd_step=fd_step, gamma=5.0)

    def objective(shift: float = 0.0, direction: list[torch.Tensor] | None = None):
        s = DsrnaSearcher(copy.deepcopy(net), **kw)
        with torch.no_grad():
            for a, d in zip(s.model.arch_parameters(), direction or []):
                a.add_(shift * d)
        return s, s.arch_objective(x, y)[0]

    s, value = objective()
    grads = torch.autograd.grad(value, s.model.arch_parameters(), allow_unused=True)
    g = torch.Generator().manual_seed(0)
    direction = [torch.randn(a.shape, generator=g, dtype=a.dtype) for a in s.model.arch_parameters()]
    slope = sum((gr * d).sum() for gr, d in zip(grads, direction) if gr is not None)
    t = 1e-6
    central = (objective(t, direction)[1] - objective(-t, direction)[1]) / (2 * t)
    torch.testing.assert_close(central.detach(), slope, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "variant,fd_step,bn_stats",
    [
        ("jacobian", 1e-6, "running"),
        ("jacobian", 0.0, "batch"),
        ("combined", 0.0, "running"),
        ("certified", 0.0, "batch"),
    ],
)
def test_robust_batch_takes_r_on_the_first_examples(variant: str, fd_step: float, bn_stats: str) -> None:
    """robust_batch = r: the objective is L_val on the whole batch minus gamma R on its first r
    examples (value and alpha-gradient, float64), on every path (the fused forward, the double
    backward, the bounds); R differs from the whole batch's."""
    net, _, (x, y) = tiny(9)
    net, x = net.double(), x.double()
    r = 3
    kw = dict(epochs=2, variant=variant, bound="crown", jacobian_fd_step=fd_step, bn_stats=bn_stats, gamma=5.0)
    s = DsrnaSearcher(copy.deepcopy(net), robust_batch=r, **kw)
    assert s.fused == (fd_step > 0)
    objective, metrics = s.arch_objective(x, y)
    got = torch.autograd.grad(objective, s.model.arch_parameters(), allow_unused=True)

    ref = DsrnaSearcher(copy.deepcopy(net), **kw)
    stats = running_stats(ref.model)
    with capture_bn_stats(ref.model) as batch_stats:
        loss = F.cross_entropy(ref.model(x), y)
    R = sum(ref.robustness(x[:r], y[:r], True, stats if bn_stats == "running" else batch_stats).values())
    want = torch.autograd.grad(loss - 5.0 * R, ref.model.arch_parameters(), allow_unused=True)
    torch.testing.assert_close(objective.detach(), (loss - 5.0 * R).detach(), rtol=1e-10, atol=1e-12)
    assert sum(a is not None for a in got) > 0
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    whole = DsrnaSearcher(copy.deepcopy(net), **kw).arch_objective(x, y)[1]["R"]
    assert not torch.isclose(metrics["R"], whole)


def test_frozen_bn_restores_modes_and_buffers() -> None:
    net, _, (x, _) = tiny(2)
    before = copy.deepcopy(net.state_dict())
    with capture_bn_stats(net) as stats:
        out_train = net(x)
    after_fwd = copy.deepcopy(net.state_dict())
    with frozen_bn(net, stats):
        assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
        out_frozen = net(x)  # BN fixed to the clean batch's statistics = the train-mode forward
    torch.testing.assert_close(out_frozen, out_train, rtol=1e-4, atol=1e-5)
    assert net.training and all(m.training for m in net.modules())
    assert _same_state_dict(net.state_dict(), after_fwd) and not _same_state_dict(before, after_fwd)


def _same_state_dict(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fd_step", [0.0, 1e-3])  # double backward; finite differences, fused
def test_exact_resume(fd_step: float) -> None:
    net, tb, vb = tiny(3)
    kw = dict(epochs=2, variant="combined", projections=1, bound="crown", jacobian_fd_step=fd_step)
    s1 = DsrnaSearcher(net, **kw)
    s1.step(tb, vb)
    state = copy.deepcopy(s1.state_dict())
    m1 = s1.step(tb, vb)
    net2, _, _ = tiny(4)  # different init, overwritten by the state
    s2 = DsrnaSearcher(net2, **kw)
    s2.load_state_dict(state)
    m2 = s2.step(tb, vb)
    assert _same_state(net, net2) and all(torch.equal(m1[k], m2[k]) for k in m1)


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_validate_and_build_the_searcher(name: str) -> None:
    cfg = load_config(ROOT / "launch" / "configs" / f"{name}.yaml")
    assert cfg.algorithm.name == "dsrna"
    algo = cfg.algorithm.model_dump(exclude={"name"})
    net = Supernet(in_channels=1, num_classes=4, C=2, layers=3, nodes=2)  # a normal cell, then two reduce
    s = DsrnaSearcher(net, epochs=cfg.epochs, **algo, **cfg.optim.model_dump(), weight_strategy=None)
    assert s.variant == cfg.algorithm.variant and s.gamma == cfg.algorithm.gamma


def test_bad_arguments_are_refused() -> None:
    net, _, _ = tiny()
    with pytest.raises(ValueError, match="variant"):
        DsrnaSearcher(net, epochs=1, variant="nope")
    with pytest.raises(ValueError, match="bound"):
        DsrnaSearcher(net, epochs=1, bound="zonotope")


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path: Path) -> None:
    from distsearch.runner import run_search
    from distsearch.storage import Store

    over = [
        "epochs=1",
        "data.subset=96",
        "data.batch_size=16",
        "space.layers=2",
        "space.nodes=2",
        "space.C=2",
        f"storage.uri={tmp_path / 'run'}",
        "monitor.progress=false",
        "monitor.tensorboard=false",
        "threads=1",
    ]
    cfg = load_config(ROOT / "launch" / "configs" / "quickstart_dsrna.yaml", over)
    result = run_search(cfg, Store(cfg.storage.uri))
    assert result.genotype is not None and len(result.genotype.normal) == 4


def test_certify_table_writers_and_plot(tmp_path: Path) -> None:
    net, _, (x, _) = tiny(5)
    net.eval()
    with torch.no_grad():
        y = net(x).argmax(1)
    rows = []
    for method in ("ibp", "crown"):
        rows += certify_table(net, x, y, [0.0, 0.001, 0.01], "linf", method, label="tiny")
    assert len(rows) == 6 and all(r["clean_acc"] == 100.0 for r in rows)
    assert all(r["certified_acc"] == 100.0 for r in rows if r["eps"] == 0.0)
    by = {(r["method"], r["eps"]): r["certified_acc"] for r in rows}
    assert all(by[("crown", e)] >= by[("ibp", e)] for e in (0.001, 0.01))
    assert rows[-1]["mean_certified_radius"] >= rows[0]["mean_certified_radius"] > 0
    write_csv(rows, tmp_path / "c.csv")
    write_markdown(rows, tmp_path / "c.md")
    plot_certified_accuracy(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000 and "certified_acc" in (tmp_path / "c.md").read_text()


def test_darts_and_dsrna_genotypes_radii_are_sound_on_mnist5k(tmp_path: Path) -> None:
    """Equal tiny budget on mnist5k (benchmarks/certified_radius.py measures a real one): each
    searched genotype is retrained; its IBP and CROWN L-inf radii are finite, >= 0, positive
    only on correctly classified images, and PGD (3 restarts) at each image's radius fails.
    A soundness check only: at this budget the two nets are weak (about 5 of 16 correct)."""
    from distsearch.config import TrainConfig
    from distsearch.config_file import parse_config
    from distsearch.robust.attacks import PGD
    from distsearch.robust.certify import mean_certified_radius
    from distsearch.runner import run_search
    from distsearch.storage import Store
    from distsearch.train import load_model, run_training

    base = {
        "seed": 0,
        "epochs": 1,
        "device": "cpu",
        "threads": 1,
        "data": {"name": "mnist5k", "subset": 128, "batch_size": 16},
        "monitor": {"tensorboard": False, "progress": False},
    }
    algos = {
        "darts": {"name": "darts"},
        "dsrna": {"name": "dsrna", "variant": "certified", "bound": "ibp", "bn_stats": "running", "eps": 0.05},
    }
    certified = 0
    for label, algo in algos.items():
        s_uri, t_uri = str(tmp_path / f"s_{label}"), str(tmp_path / f"t_{label}")
        space = {"C": 2, "layers": 2, "nodes": 2}
        run_search(parse_config(base | {"space": space, "algorithm": algo, "storage": {"uri": s_uri}}), Store(s_uri))
        model_cfg = {"genotype": s_uri, "C": 4, "layers": 2}
        train = {"model": model_cfg, "epochs": 3, "optim": {"lr": 0.1}, "eval": {"n": 0}, "storage": {"uri": t_uri}}
        tcfg = parse_config(base | train, TrainConfig)
        run_training(tcfg, Store(t_uri))
        model, data, _ = load_model(t_uri)
        x, y = data.x_test[:16], data.y_test[:16]
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        for method in ("ibp", "crown"):
            mean, r = mean_certified_radius(model, x, y, "linf", method, eps_max=0.25, steps=10)
            assert torch.isfinite(r).all() and (r >= 0).all() and math.isfinite(mean) and mean >= 0, (label, method)
            assert not (r > 0)[~correct].any(), (label, method)
            for i in torch.nonzero(r > 0).flatten().tolist():
                torch.manual_seed(i)
                xa = PGD(eps=float(r[i]), steps=20, restarts=3)(model, x[i : i + 1], y[i : i + 1])
                with torch.no_grad():
                    assert int(model(xa).argmax(1)) == int(y[i]), (label, method, i, float(r[i]))
            certified += int((r > 0).sum())
    assert certified > 0  # the PGD check above was not vacuous
