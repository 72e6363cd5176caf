"""Transfer tables, unit analysis, the game-based evaluation table and the named models
(distsearch/robust/transfer.py, units.py, evaluate.py, models.py, tables.py)."""

from __future__ import annotations

import pytest
import torch

from distsearch.robust.attacks import PGD
from distsearch.robust.evaluate import EVAL_ATTACKS, game_table, plot_robustness
from distsearch.robust.models import MODELS, build_model
from distsearch.robust.tables import read_csv, to_markdown, write_csv, write_markdown
from distsearch.robust.transfer import distortion, gaussian_like, plot_heatmap, transfer_table
from distsearch.robust.units import unit_images

try:
    from conftest_robust import cnn, mnist, test_set, trained_mlp  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.conftest_robust import cnn, mnist, test_set, trained_mlp  # noqa: F401


@pytest.fixture(scope="module")
def transfer_rows() -> list[dict]:
    """Szegedy's setting: models with other hyperparameters (width, seed) and on disjoint halves."""
    models = {
        "mlp128": trained_mlp("standard"),
        "mlp256": trained_mlp("standard", hidden=256, seed=1),
        "half1": trained_mlp("standard", half=1, seed=2),
        "half2": trained_mlp("standard", half=2, seed=3),
    }
    d = mnist()
    return transfer_table(models, d.x_test[:300], d.y_test[:300], PGD(1.5, steps=10, norm="l2"), seed=0)


def test_transfer_ordering(transfer_rows) -> None:
    by = {r["examples"]: r for r in transfer_rows}
    names = [k for k in by["clean"] if k not in ("examples", "fooled", "distortion")]
    for target in names:
        own = by[target][target]
        for source in names:
            if source == target:
                continue
            others = by[source][target]
            noise = by[f"noise({source})"][target]
            assert own > others, f"{target}: own examples {own:.1f}% vs {source}'s {others:.1f}%"
            assert others > noise, f"{target}: {source}'s examples {others:.1f}% vs noise {noise:.1f}%"
    for source in names:  # the noise baseline has the same size
        assert by[f"noise({source})"]["distortion"] == pytest.approx(by[source]["distortion"], rel=0.1)


def test_transfer_writers(transfer_rows, tmp_path) -> None:
    write_csv(transfer_rows, tmp_path / "t.csv")
    write_markdown(transfer_rows, tmp_path / "t.md")
    plot_heatmap(transfer_rows, tmp_path / "t.png")
    back = read_csv(tmp_path / "t.csv")
    assert [r["examples"] for r in back] == [r["examples"] for r in transfer_rows]
    assert float(back[1]["mlp128"]) == pytest.approx(transfer_rows[1]["mlp128"])
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("| examples | fooled | distortion | mlp128") and md.count("\n") == len(transfer_rows) + 2
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


class _MeanAboveHalf(torch.nn.Module):
    """Class 1 when an image's mean pixel is above 0.5: which images it gets wrong is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return 10 * torch.stack([0.5 - m, m - 0.5], 1)


def test_fooled_and_distortion_count_only_the_examples_that_fool_the_source(tmp_path) -> None:
    """Szegedy's mean minimum distortion is over the adversarial examples found: an image the
    source already gets wrong, or one its attack leaves or fails on, is not one (the error cells
    still count every image, as his tables do)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g)
    truth = (x.flatten(1).mean(1) > 0.5).long()
    y = truth.clone()
    y[:10] = 1 - y[:10]  # the model gets the first 10 wrong clean
    away = (1 - 2 * y).float().view(-1, 1, 1, 1)  # towards the other class

    def attack(model, xs, ys):  # noqa: ANN001, ANN202 (any callable(model, x, y) is one)
        step = torch.zeros(len(xs), 1, 1, 1)
        step[20:25], step[25:] = -0.001, 0.3  # 20-24: a nudge towards their own class; 25-39: flipped
        return (xs + step * away).clamp(0, 1)

    rows = transfer_table({"m": _MeanAboveHalf()}, x, y, attack, batch_size=64)  # one batch: the attack indexes it
    by = {r["examples"]: r for r in rows}
    assert by["clean"]["m"] == 25.0
    x_adv = attack(None, x, y)
    assert (_MeanAboveHalf()(x_adv[25:]).argmax(1) != y[25:]).all()
    assert by["m"]["m"] == 100 * (10 + 15) / 40  # every image, the clean mistakes included
    assert by["m"]["fooled"] == 100 * 15 / 30  # of the 30 images it gets right
    assert by["m"]["distortion"] == pytest.approx(float(distortion(x_adv[25:], x[25:]).mean()))
    assert by["noise(m)"]["fooled"] < 50  # same-size noise rarely crosses the boundary
    assert by["noise(m)"]["distortion"] == pytest.approx(by["m"]["distortion"], rel=1e-3)  # the same images
    unmoved = transfer_table({"m": _MeanAboveHalf()}, x, y, lambda model, xs, ys: xs)  # fools nothing
    assert [r["distortion"] for r in unmoved[1:]] == [None, None] and unmoved[1]["fooled"] == 0.0
    plot_heatmap(unmoved, tmp_path / "t.png")  # an empty distortion cell is drawn as '-'


def test_gaussian_baseline_matches_l2_norm() -> None:
    x = 0.3 + 0.4 * torch.rand(5, 1, 6, 6)
    x_adv = x + 0.05 * torch.randn_like(x)
    noise = gaussian_like(x, x_adv, torch.Generator().manual_seed(0))
    assert torch.allclose((noise - x).flatten(1).norm(dim=1), (x_adv - x).flatten(1).norm(dim=1), rtol=1e-4)
    assert torch.allclose(distortion(x_adv, x), ((x_adv - x) ** 2).flatten(1).mean(1).sqrt())


def test_unit_images(cnn, test_set, tmp_path) -> None:
    x = test_set[0][:200]
    res = unit_images(cnn, "rest.8", x, k=8, seed=0)  # the hidden fully connected layer's ReLU
    acts = torch.relu(cnn.rest[:8](cnn.first_layer(x)))
    assert torch.equal(res.unit_indices, acts[:, res.unit].topk(8).indices)
    assert res.unit_grid.shape == res.direction_grid.shape and res.unit_grid.shape[0] == 3
    assert not torch.equal(res.unit_indices, res.direction_indices)
    paths = res.save(tmp_path)
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in paths)
    with pytest.raises(ValueError, match="^layer: no module named"):
        unit_images(cnn, "nope", x)
    with pytest.raises(ValueError, match="^unit: must be"):
        unit_images(cnn, "rest.8", x, unit=10_000)


def test_game_table(cnn, test_set, tmp_path) -> None:
    x, y = test_set[0][:48], test_set[1][:48]
    rows = game_table(
        cnn,
        x,
        y,
        {"linf": [0.05, 0.1], "l2": [1.0]},
        attacks=("fgsm", "pgd-20", "cw"),
        cw_kwargs={"steps": 20, "search_steps": 2},
    )
    assert rows[0]["attack"] == "clean" and len(rows) == 1 + 2 * 2 + 3 + 3
    assert {(r["attack"], r["norm"]) for r in rows[1:]} == {
        ("fgsm", "linf"),
        ("pgd-20", "linf"),
        ("fgm", "l2"),
        ("pgd-20", "l2"),
        ("cw", "l2"),
        ("worst", "linf"),
        ("worst", "l2"),
    }
    acc = {(r["attack"], r["norm"], r["eps"]): r["accuracy"] for r in rows}
    # worst: the examples every attack failed on, at most the weakest single attack's row
    for norm, e, names in (("linf", 0.05, ("fgsm", "pgd-20")), ("linf", 0.1, ("fgsm", "pgd-20"))):
        assert acc[("worst", norm, e)] <= min(acc[(a, norm, e)] for a in names)
    write_csv(rows, tmp_path / "e.csv")
    assert "| pgd-20 | linf | 0.1000 |" in to_markdown(rows)
    plot_robustness(rows, tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="^eps: budgets"):
        game_table(cnn, x, y, {"linf": [-0.1]})
    with pytest.raises(ValueError, match="^norm: must be"):
        game_table(cnn, x, y, {"l1": [0.1]})
    with pytest.raises(ValueError, match="^attacks: unknown attack"):
        game_table(cnn, x, y, {"linf": [0.1]}, attacks=("deepfool",))


def test_game_table_worst_row_is_the_per_example_minimum(cnn, test_set, monkeypatch) -> None:
    """Two 'attacks' that each break a different half of the images: each alone leaves about
    half, the worst row (right on every attack's output) none; a minimum over rows would not."""
    x, y = test_set[:2]
    x, y = x[:64], y[:64]
    with torch.no_grad():
        right = cnn(x).argmax(1) == y

    def breaks(half: int):
        def attack(model, xb, yb):  # a blank image where half is 0 (first rows) or 1 (the rest)
            out = xb.clone()
            rows = slice(0, xb.shape[0] // 2) if half == 0 else slice(xb.shape[0] // 2, None)
            out[rows] = 0.0
            return out

        return lambda eps, norm: attack

    monkeypatch.setitem(EVAL_ATTACKS, "first", breaks(0))
    monkeypatch.setitem(EVAL_ATTACKS, "second", breaks(1))
    rows = game_table(cnn, x, y, {"linf": [0.1]}, attacks=("first", "second"), batch_size=64)
    with torch.no_grad():
        blank = cnn(torch.zeros_like(x)).argmax(1) == y
    first = right & torch.cat([blank[:32], torch.ones(32, dtype=torch.bool)])
    second = right & torch.cat([torch.ones(32, dtype=torch.bool), blank[32:]])
    want = [100.0 * int(m.sum()) / 64 for m in (right, first, second, first & second)]
    assert [r["accuracy"] for r in rows] == want
    assert [r["attack"] for r in rows] == ["clean", "first", "second", "worst"]
    assert want[3] < min(want[1], want[2])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_follow_first_layer_convention(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, num_classes=7).eval()
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        assert torch.allclose(out, model.forward_rest(model.first_layer(x)))


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="^model: unknown name 'vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="^in_channels: must be"):
        build_model("small_cnn", in_channels=0)
    with pytest.raises(ValueError, match="^model: bad option"):
        build_model("small_cnn", depth=3)
