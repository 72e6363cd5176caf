"""Checkpoints of the per-edge supernet (search_spaces/layout.py) read into the grouped one."""

import gzip
import io
from pathlib import Path

import pytest
import torch

from distsearch.runner import Interrupted, build_data, build_supernet, run_search
from distsearch.search.darts import DartsSearcher
from distsearch.storage import Store
from search_spaces.darts import Supernet, num_edges
from search_spaces.layout import ARCH, LayoutError, regroup

FIXTURE = Path(__file__).parent / "data" / "per_edge_checkpoint.pt.gz"


@pytest.fixture(scope="module")
def per_edge() -> dict:
    """Written by the per-edge code itself: tests/data/make_per_edge_checkpoint.py."""
    return torch.load(io.BytesIO(gzip.decompress(FIXTURE.read_bytes())), weights_only=True)


def _eval_logits(model: Supernet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_a_per_edge_search_continues_where_the_per_edge_code_went(per_edge):
    """Its state loaded here, one more second-order step: the same parameters, and the same
    eval-mode logits (so the same BN statistics) as the per-edge code reached. That code took
    plain finite differences for the hypergradient, so this step does too (fd_replay=False)."""
    model = Supernet(**per_edge["space"]).double()
    searcher = DartsSearcher(model, epochs=4, order="second", arch_lr=0.05, fd_replay=False)
    searcher.load_state_dict(per_edge["before"])
    searcher.step(*per_edge["batch"])
    model = searcher.model
    params = {n: p.detach() for n, p in model.named_parameters()}
    want = regroup(model, per_edge["after"], params)
    for n, p in params.items():
        torch.testing.assert_close(p.float(), want[n], rtol=1e-6, atol=1e-6)  # stored in float32
    torch.testing.assert_close(
        _eval_logits(model, per_edge["batch"][1][0]), per_edge["eval_logits"], rtol=0, atol=1e-12
    )


def test_the_check_above_sees_one_edge_in_another_edges_rows(per_edge):
    """Two edges of one group (node 0 <- s0, node 1 <- s0) swapped: the logits move."""
    state = dict(per_edge["before"]["model"])
    a, b = "cells.0.edges.0.ops.4.", "cells.0.edges.2.ops.4."  # sep_conv_3x3
    for k in [k for k in state if k.startswith(a)]:
        state[k], state[k.replace(a, b)] = state[k.replace(a, b)], state[k]
    good, bad = Supernet(**per_edge["space"]).double(), Supernet(**per_edge["space"]).double()
    good.load_state_dict(per_edge["before"]["model"])
    bad.load_state_dict(state)
    x = per_edge["batch"][1][0]
    assert (_eval_logits(good, x) - _eval_logits(bad, x)).abs().max() > 1e-4


def test_a_per_edge_checkpoint_that_does_not_fit_is_refused_by_name(per_edge):
    state = dict(per_edge["before"]["model"])
    del state["cells.1.edges.3.ops.5.2.weight"]  # node 1 <- s1, sep_conv_5x5's first 1x1 conv
    with pytest.raises(LayoutError, match=r"fills 'cells\.1\.groups\.1\.ops\.sep_conv_5x5\.3\.weight'$"):
        Supernet(**per_edge["space"]).double().load_state_dict(state)
    with pytest.raises(LayoutError, match="does not fit"):
        Supernet(**{**per_edge["space"], "C": 4}).load_state_dict(per_edge["before"]["model"])
    assert isinstance(LayoutError(), RuntimeError)  # what resume and load_model turn into one line


def _per_edge(model: Supernet, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Grouped tensors (a state_dict, or one per parameter) as the per-edge code named and
    ordered them: the inverse of layout.regroup."""
    out, done = {}, set()
    for k, v in named.items():
        if ".groups." not in k:
            out[k] = v
            continue
        c = int(k.split(".")[1])
        if c in done:
            continue
        done.add(c)
        for i in range(model.nodes):
            for s in range(2 + i):
                for o, name in enumerate(model.ops):
                    for rest, (key, rows) in model.cells[c].edge_slots(s, i, name).items():
                        if (full := f"cells.{c}.{key}") in named:
                            t = named[full] if rows is None else named[full][rows]
                            out[f"cells.{c}.edges.{num_edges(i) + s}.ops.{o}.{rest}"] = t.clone()
    return out


def test_a_search_resumed_from_a_per_edge_checkpoint_equals_an_uninterrupted_one(tmp_path, tiny_config):
    """Through run_search: the newest checkpoint rewritten in the per-edge layout (weights,
    BN statistics and SGD momenta); moving back is a copy, so the end is bitwise the same."""
    straight = Store(str(tmp_path / "straight"))
    run_search(tiny_config(straight.uri), straight)
    cfg = tiny_config(str(tmp_path / "resumed"))
    store = Store(cfg.storage.uri)
    with pytest.raises(Interrupted):
        run_search(cfg, store, stop_after_steps=6)  # epoch 1 checkpointed at step 4
    name, state, meta = store.load_latest()
    searcher = state["searcher"]
    model = build_supernet(cfg, build_data(cfg))
    names = [n for n, _ in model.named_parameters() if n not in ARCH]
    opt = searcher["w_optimizer"]
    momenta = _per_edge(model, {names[i]: s["momentum_buffer"] for i, s in opt["state"].items()})
    searcher["model"] = _per_edge(model, searcher["model"])
    searcher["w_optimizer"] = {
        "state": {i: {"momentum_buffer": t} for i, t in enumerate(momenta.values())},
        "param_groups": [{**opt["param_groups"][0], "params": list(range(len(momenta)))}],
    }
    assert any(".edges." in k for k in searcher["model"]) and not any(".groups." in k for k in searcher["model"])
    store.save_checkpoint(meta["global_step"], state, meta)

    run_search(cfg, store)
    a, b = store.load_latest()[1]["searcher"], straight.load_latest()[1]["searcher"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert store.read_json("genotype.json") == straight.read_json("genotype.json")
