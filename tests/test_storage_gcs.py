"""Store on gs:// against a GCS JSON API on loopback (gcp-storage-emulator, in memory, in this
process): what tests/test_storage.py asserts on memory:// and local folders (atomic commit,
checksum manifests, latest(), a damaged checkpoint falls back to the previous one, nothing half
written on an error, weights_only loading), what only an object store shows (another process's
new and pruned checkpoints, uploads past gcsfs's single-request size, probes, the driver lease),
and `distsearch search --out gs://...` interrupted with Ctrl-C, resumed, then `derive` and `status`.

Both come with the dev extra (pyproject.toml); skipped where gcsfs or gcp_storage_emulator is
missing.

gcsfs (2026.7.0 to 2026.10.1 checked) is by default its ExtendedGcsFileSystem, which asks the
Storage Control gRPC API each bucket's layout (zonal / hierarchical namespace) before reads and
writes; an emulator serves no gRPC, and gcsfs retries each such call for 60 s and does not cache
the failure. So GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false here, set before gcsfs is imported: the
plain GCSFileSystem, the JSON API only (what the emulator serves; buckets of the default layout).
The CLI's processes reach the emulator as a user would: STORAGE_EMULATOR_HOST, FSSPEC_GS_TOKEN=anon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported (conftest.py too)
gcsfs = pytest.importorskip("gcsfs")
emulator_server = pytest.importorskip("gcp_storage_emulator.server")
from distsearch.errors import UsageError  # noqa: E402
from distsearch.storage import Store  # noqa: E402
from tests.conftest import GCS_BUCKET, gcs_store, store_files, tiny_raw  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET = GCS_BUCKET

if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    pytest.skip(
        "gcsfs was imported with its experimental zonal/HNS layer on (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT), "
        "which waits 60 s per call on a gRPC API the emulator lacks",
        allow_module_level=True,
    )


@pytest.fixture
def endpoint(gcs_endpoint):
    return gcs_endpoint


@pytest.fixture
def store(endpoint):
    return gcs_store(endpoint)


def other_process(store: Store) -> Store:
    """The same store through a filesystem of its own (no shared listing cache), as another process has."""
    return gcs_store(store.fs._endpoint, store.uri, skip_instance_cache=True)


# -- tests/test_storage.py runs the shared properties on gs:// too (its `store` fixture) -----
def test_store_is_gcsfs_on_the_emulator(store):
    assert type(store.fs) is gcsfs.core.GCSFileSystem and store.fs._endpoint.startswith("http://127.0.0.1:")
    assert not store.is_local and store.local_root is None and store.root.startswith(f"{BUCKET}/test-")


def test_rewriting_a_checkpoint_uncommits_it_first(store):
    store.save_checkpoint(4, {"w": torch.ones(2)}, {"step": 4})
    writes = []
    original = store.write_bytes

    def spy(rel, data):  # what another process sees committed while each file of the rewrite lands
        committed = other_process(store).exists("checkpoints/ckpt-0000000004/MANIFEST.json")
        writes.append((rel.rsplit("/", 1)[-1], committed))
        original(rel, data)

    store.write_bytes = spy
    store.save_checkpoint(4, {"w": torch.zeros(2)}, {"step": 4, "again": True})
    assert writes == [("state.pt", False), ("meta.json", False), ("MANIFEST.json", False)]
    name, state, meta = other_process(store).load_latest()
    assert torch.equal(state["w"], torch.zeros(2)) and meta["again"]


@pytest.mark.parametrize("failing", ["state.pt", "meta.json", "MANIFEST.json"])
def test_a_failed_upload_commits_nothing(store, failing, monkeypatch):
    """The connection drops on one file of a new checkpoint, then on the same file of a rewrite of
    the newest: the error reaches the caller, and every process loads the last committed one."""
    store.save_checkpoint(1, {"w": torch.ones(2)}, {"step": 1})
    store.save_checkpoint(2, {"w": torch.ones(2) * 2}, {"step": 2})
    real = store.fs.pipe_file

    def drops(path, data, **kw):
        if path.endswith("/" + failing):
            raise ConnectionResetError(f"upload of {path} reset by peer")
        return real(path, data, **kw)

    monkeypatch.setattr(store.fs, "pipe_file", drops)
    with pytest.raises(ConnectionResetError):
        store.save_checkpoint(3, {"w": torch.zeros(2)}, {"step": 3})
    assert store.list_checkpoints() == ["ckpt-0000000001", "ckpt-0000000002"]
    with pytest.raises(ConnectionResetError):  # a rewrite is uncommitted before its files change
        store.save_checkpoint(2, {"w": torch.zeros(2)}, {"step": 2, "again": True})
    monkeypatch.undo()
    for s in (store, other_process(store)):
        assert s.list_checkpoints() == ["ckpt-0000000001"]
        name, state, meta = s.load_latest()
        assert name == "ckpt-0000000001" and meta == {"step": 1} and torch.equal(state["w"], torch.ones(2))


def test_a_checkpoint_refused_before_upload_writes_nothing(store):
    store.save_checkpoint(1, {"w": torch.ones(2)}, {"step": 1})
    before = store_files(store)
    for step in (1, 2):  # neither a rewrite (which would uncommit ckpt 1 first) nor a new one
        with pytest.raises(TypeError):
            store.save_checkpoint(step, {"w": torch.zeros(2)}, {"step": step, "bad": object()})  # meta is not JSON
    assert store_files(store) == before == store_files(other_process(store))
    assert store.latest() == "ckpt-0000000001"


# -- what only an object store shows ----------------------------------------------------------
def test_another_process_sees_new_and_pruned_checkpoints(store):
    """A long-lived reader (a status loop, a Tune driver, a notebook) whose filesystem has listed
    the store before: the writer's new checkpoints are found, pruned ones are not taken for
    corrupt ones, and latest() is the writer's newest."""
    reader, writer = store, other_process(store)
    writer.save_checkpoint(1, {"w": torch.ones(1)}, {"step": 1})
    writer.save_checkpoint(2, {"w": torch.ones(1) * 2}, {"step": 2})
    assert reader.latest() == "ckpt-0000000002"
    reader.fs.find(reader.path(""))  # every folder's listing now in the reader's cache
    writer.save_checkpoint(3, {"w": torch.ones(1) * 3}, {"step": 3}, keep=1)
    assert reader.list_checkpoints() == ["ckpt-0000000003"]
    name, state, meta = reader.load_latest()
    assert name == reader.latest() == "ckpt-0000000003" and meta == {"step": 3}
    writer.save_checkpoint(3, {"w": torch.zeros(1)}, {"step": 3, "again": True})  # rewritten in place
    assert reader.load_latest()[2] == {"step": 3, "again": True}


def test_a_checkpoint_past_gcsfs_single_request_size_round_trips(store, monkeypatch):
    """gcsfs uploads 50 MiB and more as a resumable upload (several requests): the object appears
    whole at the last one, so the manifest written after it still describes it."""
    resumable = []
    initiate = gcsfs.core.initiate_upload

    async def spy(fs, bucket, key, *args, **kw):
        resumable.append(key.rsplit("/", 1)[-1])
        return await initiate(fs, bucket, key, *args, **kw)

    monkeypatch.setattr(gcsfs.core, "initiate_upload", spy)
    w = torch.arange(13_200_000, dtype=torch.float32)  # 52.8 MB
    store.save_checkpoint(1, {"w": w}, {"step": 1})
    assert resumable == ["state.pt"]
    info = other_process(store).read_json("checkpoints/ckpt-0000000001/MANIFEST.json")["files"]["state.pt"]
    assert (
        info["size"] > 50 * 2**20 and store.fs.size(store.path("checkpoints/ckpt-0000000001/state.pt")) == info["size"]
    )
    name, state, _ = other_process(store).load_latest()
    assert name == "ckpt-0000000001" and torch.equal(state["w"], w)


def test_json_config_and_upload_dir(store, tmp_path):
    store.write_json("a/b.json", {"k": [1, 2]})
    assert store.read_json("a/b.json") == {"k": [1, 2]} and store.read_json("a/none.json", None) is None
    with pytest.raises(FileNotFoundError):
        store.read_json("a/none.json")
    store.write_bytes("config.json", b"{not json")
    with pytest.raises(UsageError, match=r"config.json is not valid JSON"):
        store.read_config()
    (tmp_path / "tb" / "sub").mkdir(parents=True)
    (tmp_path / "tb" / "events.1").write_bytes(b"e1")
    (tmp_path / "tb" / "sub" / "events.2").write_bytes(b"e2")
    store.upload_dir(str(tmp_path / "tb"), "tb")
    assert store.read_bytes("tb/events.1") == b"e1" and store.read_bytes("tb/sub/events.2") == b"e2"


def test_check_writable_probes_and_leaves_nothing(store, endpoint):
    assert not store.exists()
    store.check_writable()
    assert not other_process(store).exists() and store_files(other_process(store)) == {}
    with pytest.raises(UsageError, match=r"^URI: cannot write to 'gs://no-such-bucket/x'"):
        Store("gs://no-such-bucket/x", field="URI", endpoint_url=endpoint, token="anon").check_writable()


def test_driver_lease_on_gcs(store):
    """As test_driver_lease_on_s3: a claim sees the other's lease (no cached listing), a refused
    claim leaves nothing, a release frees the store."""
    from distsearch.driver_lease import DriverLease, leases, live_drivers

    first = DriverLease(store, "run").claim()
    assert len(live_drivers(other_process(store))) == 1
    with pytest.raises(UsageError, match="in use by another process"):
        DriverLease(other_process(store), "resume").claim()
    assert len(leases(store)) == 1
    first.release()
    assert leases(store) == [] and live_drivers(other_process(store)) == []
    with DriverLease(store, "resume"):
        assert len(leases(other_process(store))) == 1
    assert store_files(other_process(store)) == {}


# -- the CLI, end to end --------------------------------------------------------------------
def _cli_env(endpoint: str) -> dict[str, str]:
    """The environment of a `distsearch` process on the emulator: gcsfs's emulator variable, and
    anonymous access through fsspec's config (so no default-credential or GCE metadata lookup)."""
    return {
        **os.environ,
        "STORAGE_EMULATOR_HOST": endpoint,
        "FSSPEC_GS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "PYTHONPATH": str(ROOT),
        "MPLBACKEND": "Agg",
    }


def _cli(env: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distsearch.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, **kw
    )


def _sigint_default() -> None:  # a child of a backgrounded shell job starts with SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_cli_on_a_missing_bucket_exits_2_in_one_line(endpoint, tmp_path, monkeypatch, capsys):
    import fsspec

    from distsearch.cli import main

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_raw("unused")))
    assert main(["search", "--config", str(tmp_path / "cfg.yaml"), "--out", "gs://no-such-bucket/x"]) == 2
    assert main(["derive", "gs://no-such-bucket/run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("distsearch search: --out: cannot write to 'gs://no-such-bucket/x'")
    assert err[1].startswith("distsearch derive: URI: no valid checkpoint under 'gs://no-such-bucket/run'")


@pytest.mark.slow
def test_search_on_gcs_interrupted_resumed_derived(endpoint, tmp_path):
    """`distsearch search --out gs://...`: `status` says it runs, Ctrl-C after its first
    checkpoints, `status` says interrupted, `search --resume` finishes it, `derive` and `status`
    read it; no lease is left."""
    from distsearch.driver_lease import leases

    env = _cli_env(endpoint)
    raw = tiny_raw("unused", epochs=12, **{"storage.every_n_steps": 1, "storage.keep": 2, "monitor.progress": False})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    out = f"gs://{BUCKET}/cli-{uuid.uuid4().hex}/run"
    reader = gcs_store(endpoint, out)
    proc = subprocess.Popen(
        [sys.executable, "-m", "distsearch.cli", "search", "--config", "cfg.yaml", "--out", out],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_default,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while len(reader.list_checkpoints()) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        running = _cli(env, "status", out)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert running.returncode == 0 and "running: `search` pid" in running.stdout, running.stdout + running.stderr
    assert proc.returncode == 130 and f"distsearch search --out {out} --resume" in err, err
    assert reader.exists("config.json") and not reader.exists("result.json") and reader.latest()
    interrupted = _cli(env, "status", out)
    assert interrupted.returncode == 0, interrupted.stderr
    assert f"interrupted: continue it with `distsearch search --out {out} --resume`" in interrupted.stdout

    last = reader.latest()
    resumed = _cli(env, "-v", "search", "--out", out, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {last} (epoch" in resumed.stderr, resumed.stderr
    name, _, meta = reader.load_latest()
    assert meta["epoch"] == 12 and len(reader.list_checkpoints()) == 2 and leases(reader) == []
    derived = _cli(env, "derive", out)
    assert derived.returncode == 0 and yaml.safe_load(derived.stdout) == reader.read_json("genotype.json")
    assert f"# from {name} (epoch 12" in derived.stderr
    finished = _cli(env, "status", out)
    assert finished.returncode == 0 and "epoch 12 of 12" in finished.stdout
    assert f"finished: {out}/result.json" in finished.stdout
