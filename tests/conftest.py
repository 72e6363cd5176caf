"""Shared fixtures: tiny configs (a few channels, 2-3 cells, small images) for fast tests, and the
one local Ray of a test session (`ray_local`: tests/test_distributed.py, tests/test_distributed_gcs.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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


# -- process bookkeeping: end only what these tests started, by PID --------------------------
def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st:
            children.setdefault(st[0], []).append(pid)
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def in_session(sid: int) -> set[int]:
    return {pid for pid in _pids() if (st := _stat(pid)) and st[1] == sid}


def end_pids(pids: set[int], grace: float = 5.0) -> None:
    pids = {p for p in pids if p != os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_stat(p) for p in pids):
            time.sleep(0.2)


def kill_driver_when(driver, ready, log: Path, timeout: float = 240.0) -> None:
    """SIGKILL an experiment's driver (its own session) as soon as `ready()` holds, polled every
    0.3 s; it must still be running then (else its log's tail is shown). Its session's processes
    are ended either way."""
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and driver.poll() is None and not ready():
            time.sleep(0.3)
        assert driver.poll() is None, log.read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        end_pids(in_session(driver.pid))


_HELD_PORTS: list = []


def held_port(host: str = "127.0.0.1") -> int:
    """A free port held for the whole session by a socket bound with SO_REUSEADDR and never
    listening: no other process (Ray's many) gets it from bind(0) or connect meanwhile, yet a
    server that sets SO_REUSEADDR itself (moto's, the GCS emulator's: http.server) binds it later.
    Unserved, it refuses connections at once."""
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    _HELD_PORTS.append(sock)
    return sock.getsockname()[1]


# -- the session's Ray -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (num_cpus=2, no dashboard) for this session; yields its GCS address. It
    declares one GPU: Ray schedules fractional-GPU trials on it as on a real one (torch finds no
    CUDA, so they run on the CPU)."""
    import ray

    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    for s, handler in kept.items():  # ray.init takes SIGTERM (sys.exit) for the rest of pytest
        signal.signal(s, handler)
    address = ray.get_runtime_context().gcs_address
    yield address
    started = descendants(os.getpid())
    ray.shutdown()
    end_pids(started)


# -- a GCS API on loopback (gcp-storage-emulator, a thread of this process, in memory) ---------
GCS_BUCKET = "ckpts"


@pytest.fixture(scope="session")
def gcs_endpoint():
    """The emulator's URL (bucket GCS_BUCKET); skipped where gcsfs or the emulator is missing."""
    import socket
    import sys

    gcsfs = pytest.importorskip("gcsfs")
    emulator_server = pytest.importorskip("gcp_storage_emulator.server")
    if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        pytest.skip("gcsfs's zonal/HNS layer is on: it waits 60 s per call on a gRPC API the emulator lacks")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = emulator_server.create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    httpd = getattr(getattr(server, "_api", None), "_httpd", None)
    if httpd is not None:  # quiet when gcsfs drops a request it no longer needs (info races a GET and a list)
        report = httpd.handle_error
        httpd.handle_error = lambda request, address: (
            None if isinstance(sys.exc_info()[1], ConnectionError) else report(request, address)
        )
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        server.stop()


def gcs_store(endpoint: str, uri: str | None = None, **options):
    """A Store on the emulator (a fresh prefix unless `uri`)."""
    import uuid

    from distsearch.storage import Store

    uri = uri or f"gs://{GCS_BUCKET}/test-{uuid.uuid4().hex}/run"
    return Store(uri, endpoint_url=endpoint, token="anon", **options)


def tiny_experiment(path, epochs: int = 2, **tune) -> str:
    """A tiny experiment file: darts vs dsrna (synthetic 8x8 data, seconds per trial)."""
    import yaml

    section = {
        "search_alg": "optuna",
        "scheduler": "asha",
        "num_samples": 2,
        "max_concurrent_trials": 2,
        "resources": {"cpu": 1, "gpu": 0},
        "params": {"algorithm.name": {"choice": ["darts", "dsrna"]}},
        "points_to_evaluate": [{"algorithm.name": "darts"}, {"algorithm.name": "dsrna"}],
    }
    section.update(tune)
    path.write_text(yaml.safe_dump(tiny_raw("unused", epochs=epochs, tune=section)))
    return str(path)
