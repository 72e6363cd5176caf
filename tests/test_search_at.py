"""Searches whose weight step is an adversarial-training strategy (`weight_at:`): end to end,
α untouched by the weight step, exact resume with FreeAT's carried δ, bad sections rejected."""

import pytest
import torch

from distsearch.config_file import parse_config
from distsearch.errors import UsageError
from distsearch.robust.training import STRATEGIES
from distsearch.runner import Interrupted, build_data, build_searcher, build_supernet, run_search
from distsearch.storage import Store
from search_spaces import Genotype
from tests.conftest import tiny_raw

# name -> (kwargs, forward passes per weight step, backward passes per weight step)
SEARCH_AT = {
    "fgsm_rs": ({}, 2, 2),
    "pgd": ({"steps": 2}, 3, 3),
    "free": ({"replays": 2}, 2, 2),
}


def _cfg(uri: str, name: str, **over):
    kwargs = SEARCH_AT[name][0] if name in SEARCH_AT else {}
    at = {"strategy": name, "eps": 0.1, "kwargs": kwargs}
    return parse_config(tiny_raw(uri, weight_at=at, **{"monitor.tensorboard": False}, **over))


@pytest.mark.parametrize("name", list(SEARCH_AT))
def test_search_with_weight_at_runs_and_derives_a_genotype(tmp_path, name):
    store = Store(str(tmp_path / name))
    result = run_search(_cfg(store.uri, name), store)
    assert result.epochs == 2 and result.steps == 8
    result.genotype.validate()
    assert Genotype.from_dict(store.read_json("genotype.json")) == result.genotype
    _, fwd, bwd = SEARCH_AT[name]
    assert result.metrics["train/train_forward_passes"] == fwd  # counted, averaged over the epoch's steps
    assert result.metrics["train/train_backward_passes"] == bwd
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ("standard", "yopo")])
def test_weight_step_with_a_strategy_never_changes_alpha(tmp_path, name):
    cfg = _cfg(str(tmp_path / "s"), name, **{"optim.w_weight_decay": 0.0})  # weights move by gradients only
    data = build_data(cfg)
    model = build_supernet(cfg, data)
    searcher = build_searcher(cfg, model, data)
    assert searcher.weight_strategy is not None and searcher.weight_strategy.name == name
    alphas = [a.detach().clone() for a in model.arch_parameters()]
    weights = [w.detach().clone() for w in model.weight_parameters()]
    batch = (data.x_train[:16], data.y_train[:16])

    metrics = searcher.weight_step(batch)

    assert torch.isfinite(metrics["train_loss"])
    for before, a in zip(alphas, model.arch_parameters()):
        assert torch.equal(before, a) and a.grad is None and a.requires_grad
    assert not searcher.a_optimizer.state, "the arch optimizer was not stepped"
    assert all(w.requires_grad for w in model.weight_parameters())
    assert any(not torch.equal(b, w) for b, w in zip(weights, model.weight_parameters())), "weights moved"


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_free_search_interrupted_mid_epoch_resumes_exactly(tmp_path):
    straight = Store(str(tmp_path / "straight"))
    r1 = run_search(_cfg(straight.uri, "free"), straight)

    cfg = _cfg(str(tmp_path / "resumed"), "free", **{"storage.every_n_steps": 1})
    resumed = Store(cfg.storage.uri)
    with pytest.raises(Interrupted):
        run_search(cfg, resumed, stop_after_steps=6)  # mid epoch 2 (4 steps per epoch)
    _, state, meta = resumed.load_latest()
    assert meta["global_step"] == 6
    delta = state["searcher"]["weight_strategy"]["delta"]
    assert delta is not None and delta.abs().max() > 0, "the checkpoint carries FreeAT's δ"
    r2 = run_search(cfg, resumed)

    assert r1.genotype == r2.genotype and r1.steps == r2.steps == 8
    s1, s2 = straight.load_latest()[1]["searcher"], resumed.load_latest()[1]["searcher"]
    _assert_same_state(s1["model"], s2["model"])  # weights and α, bitwise
    assert torch.equal(s1["weight_strategy"]["delta"], s2["weight_strategy"]["delta"])
    assert r1.history[-1]["val/loss"] == r2.history[-1]["val/loss"]
    assert resumed.read_json("genotype.json") == r1.genotype.to_dict()


def test_free_resume_without_the_carried_delta_diverges(tmp_path):
    """Control: the exact-resume test above would catch a checkpoint that dropped δ."""
    straight = Store(str(tmp_path / "straight"))
    run_search(_cfg(straight.uri, "free"), straight)
    cfg = _cfg(str(tmp_path / "lossy"), "free", **{"storage.every_n_steps": 1})
    lossy = Store(cfg.storage.uri)
    with pytest.raises(Interrupted):
        run_search(cfg, lossy, stop_after_steps=6)
    _, state, meta = lossy.load_latest()
    state["searcher"]["weight_strategy"] = {}
    lossy.save_checkpoint(meta["global_step"], state, meta, keep=cfg.storage.keep)
    run_search(cfg, lossy)
    a, b = straight.load_latest()[1]["searcher"]["model"], lossy.load_latest()[1]["searcher"]["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "section,match",
    [
        ({"strategy": "nope"}, r"strategy.*unknown name 'nope'"),
        ({"strategy": "free", "kwargs": {"bogus": 1}}, r"bogus: not a parameter of strategy 'free'"),
        ({"strategy": "pgd", "kwargs": {"steps": 0}}, r"steps: must be an integer >= 1"),
    ],
)
def test_bad_weight_at_is_a_usage_error_naming_the_field(tmp_path, section, match):
    store = Store(str(tmp_path / "bad"))
    with pytest.raises(UsageError, match=match):
        run_search(parse_config(tiny_raw(store.uri, weight_at=section)), store)
    assert not store.exists("config.json"), "nothing written for a run that never started"


@pytest.mark.parametrize(
    "section,match",
    [
        ({"strategy": "free", "bogus": 1}, r"weight_at\.bogus: unknown key"),
        ({"strategy": "free", "eps": -1}, r"weight_at\.eps"),
    ],
)
def test_bad_weight_at_section_is_rejected_by_the_schema(tmp_path, section, match):
    with pytest.raises(UsageError, match=match):
        parse_config(tiny_raw(str(tmp_path / "x"), weight_at=section))


@pytest.mark.parametrize(
    "section", [{"strategy": "nope"}, {"strategy": "free", "kwargs": {"bogus": 1}}, {"strategy": "yopo"}]
)
def test_bad_weight_at_is_rejected_at_parse_time_naming_weight_at(tmp_path, section):
    with pytest.raises(UsageError, match=r"weight_at"):
        parse_config(tiny_raw(str(tmp_path / "x"), weight_at=section))
