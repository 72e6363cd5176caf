"""Properties of the adversarial-training strategies (distsearch/robust/training*.py): counted
passes match each method's definition, every update clipped to grad_clip, FreeAT's budget
rule, exact resume, FreeLB's shared dropout mask, no gradient outside the optimizer, and
robustness gained on mnist5k."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distsearch.robust.attacks import PGD
from distsearch.robust.evaluate import accuracy
from distsearch.robust.models import build_model
from distsearch.robust.training import STRATEGIES, fit, make_strategy
from tests.conftest import store_files

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


# -- run_training: resume (tiny synthetic runs, 4 steps per epoch) ------------------------------

GENOTYPE = {
    "normal": [["sep_conv_3x3", 0], ["skip_connect", 1]],
    "normal_concat": [2],
    "reduce": [["max_pool_3x3", 0], ["avg_pool_3x3", 1]],
    "reduce_concat": [2],
}
SWAPPED = GENOTYPE | {"reduce": [["avg_pool_3x3", 0], ["max_pool_3x3", 1]]}  # the same weights, another cell


def train_config(uri: str, model: dict | None = None, **over):
    """A seconds-long training run: 80 synthetic 8x8 images (64 to train on: 4 steps per epoch)."""
    from distsearch.config import TrainConfig
    from distsearch.config_file import parse_config

    raw = {
        "seed": 0,
        "epochs": 2,
        "device": "cpu",
        "threads": 1,
        "model": model or {"name": "mlp", "kwargs": {"hidden": [16]}},
        "data": {"name": "synthetic", "batch_size": 16, "synthetic": {"n": 80, "image_size": 8}},
        "eval": {"n": 0},
        "monitor": {"progress": False, "tensorboard": False},
        "storage": {"uri": uri},
    } | over
    return parse_config(raw, TrainConfig)


def test_training_resume_trains_the_stored_genotype(tmp_path, monkeypatch):
    """A resume builds the genotype its checkpoint trained, not model.genotype again: the file
    changed since (a search continued) or, relative, names nothing from another cwd; nor the run's
    genotype.json edited or deleted by hand. Each resume equals the uninterrupted run bitwise; the
    evaluated genotype.json is the one trained."""
    import json

    from distsearch.runner import Interrupted
    from distsearch.storage import Store
    from distsearch.train import run_genotype, run_training

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    (here / "g.json").write_text(json.dumps(GENOTYPE))
    monkeypatch.chdir(here)
    model = {"genotype": "g.json", "C": 4, "layers": 2}
    uris = {name: str(tmp_path / name) for name in ("straight", "changed", "moved", "edited", "deleted")}
    want = run_training(train_config(uris["straight"], model), Store(uris["straight"]))
    for name in ("changed", "moved", "edited", "deleted"):
        with pytest.raises(Interrupted):
            run_training(train_config(uris[name], model), Store(uris[name]), stop_after_steps=5)  # epoch 1 saved
    weights = Store(uris["straight"]).load_latest()[1]["model"]

    def resume(name: str) -> None:
        store = Store(uris[name])
        assert run_training(train_config(store.uri, model), store)["test/loss"] == want["test/loss"], name
        resumed = store.load_latest()[1]["model"]
        assert all(torch.equal(weights[k], resumed[k]) for k in weights), name
        assert store.read_json("genotype.json") == GENOTYPE, name

    (here / "g.json").write_text(json.dumps(SWAPPED))
    resume("changed")
    Store(uris["edited"]).write_json("genotype.json", SWAPPED)
    resume("edited")
    Store(uris["deleted"]).fs.rm(Store(uris["deleted"]).path("genotype.json"))
    resume("deleted")
    monkeypatch.chdir(elsewhere)
    resume("moved")
    # model.genotype changed on purpose (--allow-changes): that one is read
    store = Store(uris["changed"])
    other = train_config(store.uri, {**model, "genotype": str(here / "g.json")})
    assert run_genotype(other, store).to_dict() == SWAPPED
    assert run_genotype(train_config(store.uri, model), store).to_dict() == GENOTYPE


def test_a_training_run_is_read_as_its_checkpoint_recorded_it(tmp_path):
    """evaluate/attack/certify (load_model) and a resume take the genotype and config the newest
    valid checkpoint recorded: not genotype.json edited or deleted by hand, and past a newest
    checkpoint that is corrupt (its meta.json truncated), as a search does."""
    import json

    from distsearch.storage import Store
    from distsearch.train import load_model, run_training

    (tmp_path / "g.json").write_text(json.dumps(GENOTYPE))
    model = {"genotype": str(tmp_path / "g.json"), "C": 4, "layers": 2}
    want = run_training(train_config(str(tmp_path / "straight"), model, epochs=3), Store(str(tmp_path / "straight")))
    store = Store(str(tmp_path / "run"))
    run_training(train_config(store.uri, model), store)
    store.write_json("genotype.json", SWAPPED)
    assert load_model(store.uri)[0].genotype.to_dict() == GENOTYPE
    store.fs.rm(store.path("genotype.json"))
    (tmp_path / "g.json").write_text(json.dumps(SWAPPED))  # the search it came from moved on
    assert load_model(store.uri)[0].genotype.to_dict() == GENOTYPE
    newest = store.list_checkpoints()[-1]
    store.write_bytes(f"checkpoints/{newest}/meta.json", store.read_bytes(f"checkpoints/{newest}/meta.json")[:20])
    got = run_training(train_config(store.uri, model, epochs=3), store)  # from epoch 1's checkpoint
    assert got["test/loss"] == want["test/loss"] and store.read_json("genotype.json") == GENOTYPE


def _lrs(store) -> list[float]:
    return [r["lr"] for r in store.load_latest()[2]["history"]]


def test_training_resumed_with_more_epochs_anneals_over_them(tmp_path):
    """2 epochs resumed to 4: the lr of each later epoch is the cosine schedule over 4 epochs
    (the loaded T_max=2 rewound it: 0.0125, 0.0, 0.0125, 0.025), as a search resumes."""
    import math

    from distsearch.storage import Store
    from distsearch.train import run_training

    lr, lr_min = 0.05, 0.001
    store = Store(str(tmp_path / "run"))
    run_training(train_config(store.uri, epochs=2, optim={"lr": lr, "lr_min": lr_min}), store)
    run_training(train_config(store.uri, epochs=4, optim={"lr": lr, "lr_min": lr_min}), store)

    def cosine(epoch: int, epochs: int) -> float:
        return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2

    lrs = _lrs(store)
    assert lrs[:2] == pytest.approx([cosine(1, 2), cosine(2, 2)], rel=1e-9)  # as it ran
    assert lrs[2:] == pytest.approx([cosine(3, 4), cosine(4, 4)], rel=1e-9)
    assert lrs[3] == pytest.approx(lr_min, rel=1e-9)


def test_training_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    """Resumed with fewer epochs than it has begun: refused before anything is written (it used to
    rewrite config.json, and status said "epoch 2 of 1"); with as many, a finished run just finishes."""
    from distsearch.errors import UsageError
    from distsearch.runner import Interrupted
    from distsearch.storage import Store
    from distsearch.train import run_training

    store = Store(str(tmp_path / "done"))
    final = run_training(train_config(store.uri, epochs=2), store)
    before = store_files(store)
    with pytest.raises(
        UsageError, match=rf"^epochs: the run at {store.uri} has done 2 epochs; resume with epochs >= 2$"
    ):
        run_training(train_config(store.uri, epochs=1), store)
    assert store_files(store) == before
    assert run_training(train_config(store.uri, epochs=2), store) == final
    assert store.read_json("result.json")["epochs"] == 2

    store = Store(str(tmp_path / "mid"))  # killed in epoch 2 after a checkpoint at step 6
    with pytest.raises(Interrupted):
        run_training(train_config(store.uri, epochs=3, storage={"every_n_steps": 2}), store, stop_after_steps=7)
    with pytest.raises(UsageError, match=r"has done 1 epoch and part of epoch 2; resume with epochs >= 2$"):
        run_training(train_config(store.uri, epochs=1, storage={"every_n_steps": 2}), store)


# -- DARTS's retraining recipe: cutout, auxiliary head, gradient clip --------------------------


def test_cutout_zeroes_one_clipped_square_per_image_seeded() -> None:
    """Per image, the zeroed pixels are exactly rows x columns [c - L//2, c + L//2) of one
    centre, clipped at the border, in every channel (DARTS's Cutout); seeded."""
    from distsearch.data import cutout

    x = torch.rand(64, 3, 12, 10) + 0.5  # no zero pixels of its own
    out = cutout(x, torch.Generator().manual_seed(3), 6)
    assert torch.equal(out, cutout(x, torch.Generator().manual_seed(3), 6))
    clipped = 0
    for img in out:
        zero = img == 0
        assert torch.equal(zero, zero[:1].expand_as(zero))  # every channel alike
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        assert 1 <= len(rows) <= 6 and 1 <= len(cols) <= 6
        assert zero[0].sum() == len(rows) * len(cols)  # one rectangle
        assert torch.equal(rows, torch.arange(rows[0], rows[-1] + 1))
        assert torch.equal(cols, torch.arange(cols[0], cols[-1] + 1))
        clipped += len(rows) * len(cols) < 36
    assert 0 < clipped < 64  # centres near the border clip the square, interior ones do not
    assert torch.equal(out[out != 0], x[out != 0])  # the rest untouched


def test_cutout_that_cuts_nothing_or_everything_is_refused(tmp_path) -> None:
    """cutout 1 zeroes nothing (a side of 1 // 2 * 2), and one larger than the images blanked every
    training image (a run at chance, no warning): each one line naming data.cutout, from the config
    where the data set's image size is known, else (npz) when the images are read."""
    from distsearch.data import BatchStream, DataError
    from distsearch.errors import UsageError

    data = {"name": "synthetic", "batch_size": 16, "synthetic": {"n": 80, "image_size": 8}}
    with pytest.raises(UsageError, match="data.cutout: 1 zeroes nothing"):
        train_config(str(tmp_path / "o"), data={**data, "cutout": 1})
    with pytest.raises(UsageError, match="data.cutout: Input should be a valid integer"):
        train_config(str(tmp_path / "o"), data={**data, "cutout": True})
    with pytest.raises(UsageError, match="data.cutout: 9 is larger than synthetic's 8x8 images; at most 8"):
        train_config(str(tmp_path / "o"), data={**data, "cutout": 9})
    with pytest.raises(UsageError, match="data.cutout: 29 is larger than mnist5k's 28x28 images; at most 28"):
        train_config(str(tmp_path / "o"), data={"name": "mnist5k", "cutout": 29})
    x, y = torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(DataError, match="data.cutout: 9 is larger than the 8x8 images; at most 8"):
        BatchStream(x, y, torch.arange(4), 2, 0, "cpu", cutout=9)
    assert not (tmp_path / "o").exists()


def test_auxiliary_loss_is_added_with_its_weight() -> None:
    """One standard step with auxiliary_weight w moves the weights as SGD on
    CE(logits) + w * CE(aux_logits) of the same forward (float64, no drop path); w = 0 leaves
    the auxiliary head without gradient."""
    from search_spaces import Genotype, Network

    torch.manual_seed(0)
    net = Network(Genotype.from_dict(GENOTYPE), in_channels=1, num_classes=3, C=4, layers=3, auxiliary=True).double()
    x, y = torch.rand(8, 1, 8, 8, dtype=torch.double), torch.randint(0, 3, (8,))
    want = copy.deepcopy(net)
    logits = want(x)
    loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(want.aux_logits, y)
    grads = torch.autograd.grad(loss, list(want.parameters()))
    with torch.no_grad():
        for p, g in zip(want.parameters(), grads):
            p -= 0.1 * g
    for w in (0.4, 0.0):
        model = copy.deepcopy(net)
        strategy = make_strategy("standard")
        strategy.aux_weight = w
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        metrics = strategy.step(model, x, y, opt)
        head = [p.grad for p in model.auxiliary_head.parameters()]
        if w:
            assert "aux_loss" in metrics
            for (k, a), b in zip(model.state_dict().items(), want.state_dict().values()):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=k)
        else:
            assert "aux_loss" not in metrics and all(g is None for g in head)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"model": {"name": "mlp", "auxiliary_weight": 0.4}}, "only a genotype's network has an auxiliary head"),
        (
            {"model": {"genotype": "g.json", "auxiliary_weight": 0.4}, "strategy": {"strategy": "pgd"}},
            "model.auxiliary_weight: the auxiliary head trains with strategy standard only",
        ),
    ],
)
def test_auxiliary_weight_is_refused_where_nothing_would_train_it(tmp_path, over, needle) -> None:
    from distsearch.errors import UsageError

    with pytest.raises(UsageError, match=needle):
        train_config(str(tmp_path / "o"), **over)


def test_darts_recipe_run_resumes_exactly(tmp_path) -> None:
    """Cutout, augmentation, the auxiliary head, drop path and a gradient clip together: a run
    interrupted mid-epoch and resumed ends bitwise where the uninterrupted one does."""
    import json

    from distsearch.runner import Interrupted
    from distsearch.storage import Store
    from distsearch.train import run_training

    (tmp_path / "g.json").write_text(json.dumps(GENOTYPE))
    model = {"genotype": str(tmp_path / "g.json"), "C": 4, "layers": 3, "drop_path_prob": 0.2, "auxiliary_weight": 0.4}
    over = {
        "data": {
            "name": "synthetic",
            "batch_size": 16,
            "augment": True,
            "cutout": 4,
            "synthetic": {"n": 80, "image_size": 8},
        },
        "optim": {"grad_clip": 0.5},
    }
    a, b = (train_config(str(tmp_path / n), model, **over) for n in ("a", "b"))
    ra = run_training(a, Store(a.storage.uri))
    with pytest.raises(Interrupted):
        run_training(b, Store(b.storage.uri), stop_after_steps=6)
    rb = run_training(b, Store(b.storage.uri))
    assert ra["test/loss"] == rb["test/loss"]
    sa, sb = (Store(c.storage.uri).load_latest()[1]["model"] for c in (a, b))
    assert sa.keys() == sb.keys() and any(k.startswith("auxiliary_head") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for name, change in (("no_clip", {"optim": {}}), ("no_cutout", {"data": {**over["data"], "cutout": 0}})):
        c = train_config(str(tmp_path / name), model, **over | change)  # each part takes effect
        run_training(c, Store(c.storage.uri))
        sc = Store(c.storage.uri).load_latest()[1]["model"]
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_a_genotype_that_cannot_be_read_is_one_usage_error(tmp_path):
    from distsearch.errors import UsageError
    from distsearch.train import read_genotype

    (tmp_path / "bin.json").write_bytes(b"\xff\xfe")
    for ref, match in [(str(tmp_path / "bin.json"), "codec can't decode"), ("foo://x/y", "Protocol not known")]:
        with pytest.raises(UsageError, match=rf"^model.genotype: {ref}: .*{match}"):
            read_genotype(ref)
