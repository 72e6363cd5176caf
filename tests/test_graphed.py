"""The CUDA-graph step (search/graphed.py): what can be checked without a GPU. Its zero
optimiser-state initialisation gives bitwise the steps lazy initialisation gives; with
capture=False its warm-up, staging and re-capture logic gives bitwise the plain steps; every
way of asking for a graph on a CPU is refused with one clear message and nothing written."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from distsearch.config_file import parse_config
from distsearch.errors import UsageError
from distsearch.runner import run_search
from distsearch.search.graphed import GraphedStep, _init_states_like
from distsearch.storage import Store
from tests.conftest import tiny_raw, tiny_searcher


@pytest.mark.parametrize("over", [{}, {"algorithm": {"name": "lease", "attack_steps": 2}}])
def test_zero_initialised_optimiser_states_equal_lazy_ones(over):
    lazy, batches = tiny_searcher(**over)
    eager = copy.deepcopy(lazy)
    shadow = copy.deepcopy(lazy)
    for _ in range(2):
        shadow.step(*batches)
    _init_states_like(eager, shadow)  # what GraphedStep does before capturing
    assert all(opt.state for opt in eager._optimisers().values())
    for k in range(3):
        for searcher in (lazy, eager):
            torch.manual_seed(k)  # LeaSE's attacks draw random starts
            searcher.step(*batches)
    a, b = lazy.state_dict(), eager.state_dict()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for name in ("w_optimizer", "a_optimizer"):
        for i, st in a[name]["state"].items():
            for key, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[name]["state"][i][key])), (name, i, key)


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"algorithm": {"name": "lease", "attack_steps": 2}},
        {"algorithm": {"name": "dsrna", "projections": 2, "jacobian_fd_step": 1e-3}},  # the split BN
        # second order (the replayed pattern), R on part of the batch
        {
            "algorithm": {
                "name": "dsrna",
                "order": "second",
                "projections": 1,
                "jacobian_fd_step": 1.0,
                "robust_batch": 3,
            }
        },
    ],
)
def test_staged_steps_equal_plain_steps_across_lr_changes(over):
    torch.manual_seed(0)
    plain, batches = tiny_searcher(**over)
    torch.manual_seed(0)  # an identical twin (a deep copy would unhook its lr scheduler's step counter)
    staged_searcher, _ = tiny_searcher(**over)
    staged = GraphedStep(staged_searcher, warmup=2, capture=False)
    g = torch.Generator().manual_seed(5)
    x, y = (torch.cat(t) for t in zip(*batches))
    for epoch in range(2):
        for _ in range(3):
            perm = torch.randperm(16, generator=g)[:8]  # new batch contents each step, same shapes
            bt, bv = (x[perm], y[perm]), (x[perm.flip(0)], y[perm.flip(0)])
            torch.manual_seed(epoch)
            want = plain.step(bt, bv)
            torch.manual_seed(epoch)
            got = staged(bt, bv)
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        plain.end_epoch()
        staged_searcher.end_epoch()  # the cosine schedule moves the lr: a new capture
    assert staged.captures == 2
    fresh = GraphedStep(tiny_searcher(**over)[0], warmup=2, capture=False)
    rng = torch.get_rng_state()
    fresh._warm_up(batches)  # LeaSE's warm-up draws random starts: the generator is put back
    assert torch.equal(torch.get_rng_state(), rng)
    a, b = plain.state_dict(), staged_searcher.state_dict()
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_graphed_step_refuses_a_cpu_searcher():
    searcher, _ = tiny_searcher()
    with pytest.raises(ValueError, match="cuda_graph: needs the search on a CUDA device"):
        GraphedStep(searcher)


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"cuda_graph": True, "device": "cpu"}, "cuda_graph: needs device cuda"),
        (
            {"cuda_graph": True, "device": "auto", "weight_at": {"strategy": "free", "eps": 0.1}},
            "weight_at strategy free",
        ),
    ],
)
def test_config_refuses_uncapturable_settings(over, needle):
    with pytest.raises(UsageError, match=needle):
        parse_config(tiny_raw("memory://unused", **over))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_run_search_refuses_cuda_graph_without_a_gpu(tmp_path):
    cfg = parse_config(tiny_raw(str(tmp_path / "run"), cuda_graph=True, device="auto"))
    with pytest.raises(UsageError, match="cuda_graph: needs a GPU"):
        run_search(cfg, Store(cfg.storage.uri))
    assert not (tmp_path / "run").exists()


def test_a_capturable_checkpoint_resumes_on_the_cpu():
    """A CUDA-graph run saves capturable Adam groups; loaded off the GPU they step eagerly."""
    searcher, batches = tiny_searcher()
    searcher.step(*batches)
    state = searcher.state_dict()
    for group in state["a_optimizer"]["param_groups"]:
        group["capturable"] = True  # as make_capturable leaves it on a GPU
    fresh, _ = tiny_searcher()
    fresh.load_state_dict(state)
    assert not any(g["capturable"] for g in fresh.a_optimizer.param_groups)
    fresh.step(*batches)


class _PoolRule:
    """PyTorch's rule for a shared graph pool (c10 CUDACachingAllocator, create_or_incref_pool):
    each live graph holds the pool once; a pool whose graphs are all destroyed stays listed
    while it caches blocks, and capturing into it then fails an internal assert."""

    def __init__(self):
        self.count: dict[object, int] = {}
        count = self.count

        class Graph:
            pool = None

            def replay(self):
                pass

            def __del__(self):
                if self.pool is not None:
                    count[self.pool] -= 1

        self.Graph = Graph

    def capture(self, graph, pool):
        if self.count.get(pool, 1) <= 0:
            raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED")
        self.count[pool] = self.count.get(pool, 0) + 1
        graph.pool = pool
        return contextlib.nullcontext()


def test_a_recapture_never_captures_into_a_pool_no_graph_holds(monkeypatch):
    rule = _PoolRule()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", rule.Graph)
    monkeypatch.setattr(torch.cuda, "graph", rule.capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    searcher, batches = tiny_searcher()
    step = GraphedStep(searcher, warmup=1, capture=False)
    step.capture, step.pool = True, "shared"  # the CUDA path, on a CPU searcher
    for _ in range(3):
        step(*batches)
        searcher.end_epoch()  # the lr changes: the next call captures again
    assert step.captures == 3 and rule.count["shared"] == 1
