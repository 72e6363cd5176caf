"""Shared fixtures: tiny configs (a few channels, 2-3 cells, small images) for fast tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# gcsfs's default layer asks a gRPC API the GCS emulator lacks (60 s per call): tests/test_storage_gcs.py
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def tiny_raw(uri: str, **over) -> dict:
    """A raw config dict for a seconds-long search on synthetic 8x8 data."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "epochs": 2,
        "device": "cpu",
        "threads": 1,
        "data": {
            "name": "synthetic",
            "batch_size": 16,
            "eval_batch_size": 64,
            "synthetic": {"n": 160, "channels": 1, "image_size": 8, "num_classes": 3},
        },
        "space": {"C": 2, "layers": 2, "nodes": 2},
        "optim": {"arch_lr": 0.01},
        "algorithm": {"name": "darts", "order": "first"},
        "storage": {"uri": uri},
        "monitor": {"progress": False, "log_every": 1},
    }
    for k, v in over.items():
        node = raw
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return raw


def store_files(store) -> dict[str, bytes]:
    """Every file of a Store and its bytes: compare before and after to show nothing was written."""
    return {f: store.fs.cat_file(f) for f in store.fs.find(store.path(""))}


def tiny_searcher(**over):
    """A Searcher built from tiny_raw(**over) as the runner builds it, and two 8-example
    batches (train, val) of its data."""
    from distsearch.config_file import parse_config
    from distsearch.runner import build_data, build_searcher, build_supernet

    cfg = parse_config(tiny_raw("memory://unused", **over))
    data = build_data(cfg)
    searcher = build_searcher(cfg, build_supernet(cfg, data), data)
    x, y = data.x_train[:16], data.y_train[:16]
    return searcher, ((x[:8], y[:8]), (x[8:], y[8:]))


@pytest.fixture
def tiny_config():
    from distsearch.config_file import parse_config

    def make(uri: str, **over):
        return parse_config(tiny_raw(uri, **over))

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: on a shared 2-core machine OpenMP spinning makes the
    small tensors of these tests crawl (configs that set `threads` still set their own)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
