"""Shared, cached fixtures for the robustness tests (imported by tests/test_attacks.py etc.).

Tiny models on small mnist5k subsets, trained once per session: the builders are cached with
functools.cache, so every test module that imports these fixtures reuses the same models.
Training runs on one thread (the test machine is small and shared); the thread count is
restored afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import pytest
import torch

from distsearch.data import load_dataset
from distsearch.robust.models import build_model
from distsearch.robust.training import fit, make_strategy

# the ε at which robustness is asserted: L∞ for sign-based strategies, L2 for FGM/FreeLB
EPS_LINF, EPS_L2 = 0.1, 1.5
STRATEGY_KWARGS = {
    "standard": {},
    "fgsm": {"eps": EPS_LINF},
    "fgsm_rs": {"eps": EPS_LINF},
    "fgm": {"eps": EPS_L2},
    "pgd": {"eps": EPS_LINF, "steps": 5},
    "free": {"eps": EPS_LINF, "replays": 4},
    "yopo": {"eps": EPS_LINF, "m": 3, "n": 3},
    "freelb": {"eps": EPS_L2, "steps": 3},
    "trades": {"eps": EPS_LINF, "beta": 1.0, "steps": 5},
}
L2_STRATEGIES = ("fgm", "freelb")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def mnist():
    return load_dataset("mnist5k", seed=0)


@functools.cache
def trained_cnn(n_train: int = 3000, epochs: int = 3) -> torch.nn.Module:
    """A small CNN with standard training (about 95 % clean test accuracy)."""
    d = mnist()
    with one_thread():
        torch.manual_seed(0)
        model = build_model("small_cnn", 1, 10, width=8, hidden=64)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        fit(model, make_strategy("standard"), d.x_train[:n_train], d.y_train[:n_train], epochs, opt, 64, seed=0)
    return model.eval()


@functools.cache
def trained_mlp(
    strategy: str, epochs: int = 4, n_train: int = 3000, hidden: int = 128, half: int = 0, seed: int = 0
) -> torch.nn.Module:
    """An MLP trained with `strategy` (STRATEGY_KWARGS) on mnist5k; `half` 1 or 2 picks a disjoint half."""
    d = mnist()
    x, y = d.x_train[:n_train], d.y_train[:n_train]
    if half:
        x, y = x[half - 1 :: 2], y[half - 1 :: 2]
    with one_thread():
        torch.manual_seed(seed)
        model = build_model("mlp", 1, 10, hidden=(hidden,))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        fit(model, make_strategy(strategy, **STRATEGY_KWARGS[strategy]), x, y, epochs, opt, 64, seed=seed)
    return model.eval()


@pytest.fixture(scope="session")
def cnn() -> torch.nn.Module:
    return trained_cnn()


@pytest.fixture(scope="session")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    d = mnist()
    return d.x_test[:400], d.y_test[:400]
