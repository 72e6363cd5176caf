"""No host synchronisation inside `Searcher.step` (../shared/DESIGN.md, "Fast from day one"):
every algorithm and weight strategy runs a step under a dispatch mode that records the ops
which make a GPU wait for the host (`.item()`, `if tensor`, boolean-mask indexing, nonzero,
unique, equal). On the CPU the same ops dispatch, so this catches them without a GPU. The
optimisers' own step counters are exempt: they are CPU scalars by design."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import tiny_searcher

SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "unique", "_unique2", "equal")


class SyncRecorder(TorchDispatchMode):
    def __init__(self, exempt: set[int]):
        super().__init__()
        self.exempt, self.hits = exempt, []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.__name__.split(".")[0]
        if name in SYNCING and not (args and id(args[0]) in self.exempt):
            self.hits.append(str(func))
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                self.hits.append(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


CASES = {
    "darts-first": {},
    "darts-second": {"algorithm.order": "second"},
    "dsrna-jacobian": {"algorithm": {"name": "dsrna", "projections": 1}},
    "dsrna-jacobian-fd": {"algorithm": {"name": "dsrna", "projections": 1, "jacobian_fd_step": 1e-3}},
    "dsrna-certified-ibp": {"algorithm": {"name": "dsrna", "variant": "certified"}},
    "dsrna-combined-crown": {
        "algorithm": {"name": "dsrna", "variant": "combined", "bound": "crown", "bn_stats": "batch"}
    },
    "lease": {"algorithm": {"name": "lease", "attack_steps": 2}},
    "darts+pgd": {"weight_at": {"strategy": "pgd", "eps": 0.1, "kwargs": {"steps": 2}}},
    "darts+trades": {"weight_at": {"strategy": "trades", "eps": 0.1, "kwargs": {"steps": 2}}},
    "darts+free": {"weight_at": {"strategy": "free", "eps": 0.1, "kwargs": {"replays": 2}}},
    "darts+fgsm_rs": {"weight_at": {"strategy": "fgsm_rs", "eps": 0.1}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_search_step_never_waits_for_the_host(case: str) -> None:
    searcher, batches = tiny_searcher(**CASES[case])
    searcher.step(*batches)  # optimiser states exist from here on
    exempt = {id(s["step"]) for opt in searcher._optimisers().values() for s in opt.state.values() if "step" in s}
    with SyncRecorder(exempt) as rec:
        searcher.step(*batches)
    assert not rec.hits, f"{case}: host syncs in a step: {sorted(set(rec.hits))}"
