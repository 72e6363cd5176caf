"""Ray Tune experiments on gs://, end to end on loopback: `distsearch run --storage gs://...`,
`status`, `resume` (of a finished experiment and of one whose driver was SIGKILLed) and
`tensorboard` against gcp-storage-emulator (a process of its own on 127.0.0.1, in memory, bucket
`exp`), as tests/test_distributed.py does on moto S3.

Two clients write an experiment on gs://: our Store (trial checkpoints, genotypes, event files,
the experiment file, the driver lease) through gcsfs, and Tune itself (its experiment state,
tuner.pkl, each trial's result.json and pointer checkpoints) through the pyarrow filesystem Ray
picks from the URI: pyarrow.fs.FileSystem.from_uri("gs://...") -> pyarrow.fs.GcsFileSystem with
default credentials. These tests leave that path as it is for real GCS and point both clients at
the emulator with environment variables only:

- gcsfs: STORAGE_EMULATOR_HOST, and FSSPEC_GS_TOKEN=anon (fsspec's config; in this process the
  `gs` entry of fsspec.config.conf);
- pyarrow (google-cloud-cpp): CLOUD_STORAGE_EMULATOR_ENDPOINT, and GOOGLE_APPLICATION_CREDENTIALS
  naming a throwaway service-account key made here. google-cloud-cpp resolves default credentials
  even when the emulator variable is set (it has no anonymous mode by URI or variable) and, with no
  key file, asks the GCE metadata server, retrying for minutes; with a service-account key it signs
  its own JWT and sends it to the emulator, which ignores it, so no token endpoint is asked.
  GCE_METADATA_ROOT is pointed at a closed loopback port besides, so nothing can leave loopback.

All are set before Ray starts (the session's Ray from tests/conftest.py), so its workers inherit
them, as the S3 tests do with AWS_ENDPOINT_URL. Skipped without gcsfs, gcp_storage_emulator or a
pyarrow built with GCS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported (as conftest.py)
pytest.importorskip("ray")
pytest.importorskip("optuna")
gcsfs = pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")
pytest.importorskip("pyarrow._gcsfs", reason="pyarrow built without GCS")
serialization = pytest.importorskip("cryptography.hazmat.primitives.serialization")
from conftest import _stat, end_pids, held_port, in_session, kill_driver_when, tiny_experiment  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

from distsearch.cli import main  # noqa: E402

if gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    pytest.skip(
        "gcsfs was imported with its experimental zonal/HNS layer on (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT), "
        "which waits 60 s per call on a gRPC API the emulator lacks",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "exp"


GCS_PORT = held_port()  # chosen now: Ray's workers inherit the endpoint
ENDPOINT = f"http://127.0.0.1:{GCS_PORT}"
KEY_FILE = os.path.join(tempfile.gettempdir(), f"dsr-gcs-key-{os.getpid()}.json")  # written by gcs_server
ENV = {  # the Ray settings of tests/test_distributed.py, then the emulator's
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONPATH": str(ROOT),
    "STORAGE_EMULATOR_HOST": ENDPOINT,
    "FSSPEC_GS_TOKEN": "anon",
    "NO_GCE_CHECK": "true",
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": ENDPOINT,
    "GOOGLE_APPLICATION_CREDENTIALS": KEY_FILE,
    "GCE_METADATA_ROOT": f"127.0.0.1:{held_port()}",  # closed: never the link-local metadata server
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
}
os.environ.update(ENV)  # before Ray starts, so its workers inherit it


def _write_service_account_key(path: str) -> None:
    """A throwaway service-account key: google-cloud-cpp signs its own JWTs with it (no token
    endpoint); the emulator accepts any Authorization header."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "distsearch-test",
        "private_key_id": "0",
        "private_key": pem,
        "client_email": "tests@distsearch-test.iam.gserviceaccount.com",
        "client_id": "0",
        "token_uri": ENV["GCE_METADATA_ROOT"].join(("http://", "/token")),  # closed loopback port, never asked
    }
    with open(path, "w") as f:
        json.dump(info, f)


@pytest.fixture(scope="module")
def gcs_server():
    """gcp-storage-emulator on 127.0.0.1:GCS_PORT (its own process, in memory, bucket BUCKET),
    stopped by PID afterwards; the service-account key written for the module's tests."""
    _write_service_account_key(KEY_FILE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", str(GCS_PORT)]
        + ["--in-memory", "--default-bucket", BUCKET, "-q"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", GCS_PORT), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the GCS emulator did not start"
                time.sleep(0.1)
        gcsfs.GCSFileSystem.clear_instance_cache()
        yield ENDPOINT
    finally:
        end_pids(in_session(proc.pid), grace=1.0)
        gcsfs.GCSFileSystem.clear_instance_cache()
        if os.path.exists(KEY_FILE):
            os.remove(KEY_FILE)


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """gs://exp/runs, and a gcsfs client of the emulator; this process's fsspec config says `anon`
    for gs:// (FSSPEC_GS_TOKEN reaches only processes that import fsspec after it is set)."""
    import fsspec

    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "anon"})
    gcsfs.GCSFileSystem.clear_instance_cache()
    return f"gs://{BUCKET}/runs", gcsfs.GCSFileSystem(endpoint_url=gcs_server, token="anon", skip_instance_cache=True)


def experiment(path: Path, epochs: int = 1, **tune) -> str:
    """conftest's tiny experiment (darts vs dsrna, synthetic 8x8 data), one epoch, FIFO."""
    return tiny_experiment(path, epochs, **{"scheduler": "fifo", **tune})


def trial_ids(fs, root: str) -> list[str]:
    return sorted(p.split("/")[-3] for p in fs.glob(f"{root}/*/search/trial_starts.json"))


def status_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.split()}


def test_pyarrow_reaches_the_emulator_as_ray_opens_gs(gcs):
    """What Ray does with a gs:// storage_path (ray.train._internal.storage.get_fs_and_path, no
    storage_filesystem given): pyarrow.fs.FileSystem.from_uri, a GcsFileSystem; here it talks to
    the emulator (CLOUD_STORAGE_EMULATOR_ENDPOINT) with the throwaway key, and gcsfs sees its writes."""
    import pyarrow.fs
    from ray.train._internal.storage import get_fs_and_path

    base, fs = gcs
    pa_fs, path = get_fs_and_path(f"{base}/probe")
    assert isinstance(pa_fs, pyarrow.fs.GcsFileSystem) and path == f"{BUCKET}/runs/probe"
    t0 = time.monotonic()
    pa_fs.create_dir(f"{path}/d")
    with pa_fs.open_output_stream(f"{path}/d/x.json") as f:
        f.write(b'{"a": 1}')
    assert fs.cat(f"{path}/d/x.json") == b'{"a": 1}'
    pa_fs.delete_dir(path)
    assert not fs.exists(f"{path}/d/x.json") and time.monotonic() - t0 < 10


@pytest.mark.slow
def test_two_trials_on_gcs_then_status_and_resume(ray_local, gcs, tmp_path, capsys):
    """`run --storage gs://...` finishes both trials; our files (genotypes, event files) and
    Tune's (experiment state, tuner.pkl, each trial's result.json) are in the bucket; `status`
    reads them back; `resume` of the finished experiment restores it and runs nothing again."""
    base, fs = gcs
    f = experiment(tmp_path / "exp.yaml")
    assert main(["run", "--config", f, "--storage", base, "--name", "gsexp"]) == 0
    root = f"{BUCKET}/runs/gsexp"
    trials = trial_ids(fs, root)
    assert len(trials) == 2
    genotypes = fs.glob(f"{root}/*/search/genotype.json")
    assert len(genotypes) == 2 and all(json.loads(fs.cat(g))["normal"] for g in genotypes)
    assert len({p.split("/")[-4] for p in fs.glob(f"{root}/*/search/tb/events.out.tfevents*")}) == 2
    assert fs.exists(f"{root}/distsearch_experiment.json")
    # Tune's own state, written through pyarrow
    assert fs.glob(f"{root}/experiment_state-*.json") and fs.exists(f"{root}/tuner.pkl")
    assert all(fs.cat(f"{root}/{t}/result.json").strip() for t in trials)
    assert fs.glob(f"{root}/*/checkpoint_*/distsearch_checkpoint.json")
    assert not fs.glob(f"{root}/drivers/*.json")  # the driver's lease is released
    capsys.readouterr()

    assert main(["status", f"{base}/gsexp"]) == 0
    rows = status_rows(capsys.readouterr().out)
    assert {t: rows[t][1:3] for t in trials} == {t: ["TERMINATED", "1"] for t in trials}, rows

    assert main(["resume", f"{base}/gsexp"]) == 0
    for t in trials:
        assert len(json.loads(fs.cat(f"{root}/{t}/search/trial_starts.json"))) == 1  # nothing ran again


@pytest.mark.slow
def test_killed_driver_then_resume_on_gcs(ray_local, gcs, tmp_path):
    """A driver (its own process, joining the session's Ray) SIGKILLed once one trial finished
    and the other has reported a checkpoint: `status` says INTERRUPTED, `resume gs://...`
    finishes the other trial from its checkpoint and leaves the finished one alone."""
    base, fs = gcs
    epochs = 5  # the kill must land between the second trial's first checkpoint + 1.5 s and its end
    f = experiment(tmp_path / "exp.yaml", epochs=epochs, max_concurrent_trials=1)
    root = f"{BUCKET}/runs/killed"
    cmd = [sys.executable, "-m", "distsearch.cli", "run", "--config", f, "--storage", base, "--name", "killed"]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [*cmd, "--address", ray_local], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    seen = {}

    def ready() -> bool:
        fs.invalidate_cache()
        done = {p.split("/")[-3] for p in fs.glob(f"{root}/*/search/result.json")}
        for m in fs.glob(f"{root}/*/search/checkpoints/*/MANIFEST.json"):
            if m.split("/")[-5] not in done:
                seen.setdefault(m, time.time())
        # the other trial reported a checkpoint more than 1.5 s ago: Tune's saved state
        # (saved every second here) then holds its pointer, which the resume must follow
        return bool(done) and any(time.time() - t > 1.5 for m, t in seen.items() if m.split("/")[-5] not in done)

    kill_driver_when(driver, ready, tmp_path / "driver.log")
    fs.invalidate_cache()
    finished = {p.split("/")[-3] for p in fs.glob(f"{root}/*/search/result.json")}
    assert len(finished) == 1

    out = subprocess.run(
        [sys.executable, "-m", "distsearch.cli", "status", f"{base}/killed"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = status_rows(out.stdout)
    unfinished = set(trial_ids(fs, root)) - finished
    assert rows[next(iter(finished))][1] == "TERMINATED", out.stdout + out.stderr
    assert {rows[t][1] for t in unfinished} == {"INTERRUPTED"}, out.stdout + out.stderr
    assert f"distsearch resume {base}/killed" in out.stdout

    rc = subprocess.run(
        [sys.executable, "-m", "distsearch.cli", "resume", f"{base}/killed", "--address", ray_local],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rc.returncode == 0, rc.stdout[-2000:] + rc.stderr[-2000:]
    fs.invalidate_cache()
    for t in trial_ids(fs, root):
        starts = json.loads(fs.cat(f"{root}/{t}/search/trial_starts.json"))
        assert json.loads(fs.cat(f"{root}/{t}/search/result.json"))["epochs"] == epochs
        if t in finished:
            assert len(starts) == 1, starts
        else:
            assert len(starts) == 2 and starts[1]["epoch"] >= 1, starts


@pytest.mark.parametrize(
    "unset,other,command",
    [
        ("CLOUD_STORAGE_EMULATOR_ENDPOINT", None, "run"),
        ("CLOUD_STORAGE_EMULATOR_ENDPOINT", None, "resume"),
        ("CLOUD_STORAGE_EMULATOR_ENDPOINT", None, "status"),
        ("STORAGE_EMULATOR_HOST", None, "run"),  # (resume, status: gcsfs would ask real GCS first)
        (None, "http://127.0.0.1:9", "run"),
        (None, "http://127.0.0.1:9", "status"),
    ],
)
def test_one_emulator_variable_without_the_other_is_refused(gcs, tmp_path, monkeypatch, capsys, unset, other, command):
    """Only gcsfs (or only pyarrow) sent to an emulator would split an experiment between the
    emulator and real GCS, or leave Tune waiting minutes for credentials: exit 2, one line naming
    the variable to set, before Ray starts, nothing written."""
    base, fs = gcs
    if unset:
        monkeypatch.delenv(unset)
    if other:
        monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", other)
    fs.invalidate_cache()
    before = fs.find(BUCKET)
    args = {
        "run": ["run", "--config", experiment(tmp_path / "exp.yaml"), "--storage", base, "--name", "split"],
        "resume": ["resume", f"{base}/split"],
        "status": ["status", f"{base}/split"],
    }[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    field = "--storage" if command == "run" else "URI"
    assert len(err) == 1 and err[0].startswith(f"distsearch {command}: {field}: gs://{BUCKET}/runs"), err
    needed = {
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": f"reads CLOUD_STORAGE_EMULATOR_ENDPOINT: set it to {ENDPOINT} too",
        "STORAGE_EMULATOR_HOST": f"reads STORAGE_EMULATOR_HOST: set it to {ENDPOINT} too",
        None: "name different emulators",
    }[unset]
    assert needed in err[0], err
    fs.invalidate_cache()
    assert fs.find(BUCKET) == before


def test_tensorboard_on_gcs_serves_a_temporary_copy_and_deletes_it(gcs, monkeypatch, capsys):
    """`distsearch tensorboard gs://...` copies the event files of every trial to a temporary
    folder, runs TensorBoard there (here a stand-in that exits 0) and deletes the copy."""
    base, fs = gcs
    for trial in ("t1", "t2"):
        fs.pipe(f"{BUCKET}/runs/tbexp/{trial}/search/tb/events.out.tfevents.1.host", b"event")
        fs.pipe(f"{BUCKET}/runs/tbexp/{trial}/search/result.json", b"{}")
    real_popen, seen = subprocess.Popen, {}

    def fake_popen(cmd, **kw):  # TensorBoard's command line; a child that exits at once runs instead
        logdir = Path(cmd[cmd.index("--logdir") + 1])
        seen.update(cmd=cmd, logdir=logdir, files=sorted(str(p.relative_to(logdir)) for p in logdir.rglob("*.*")))
        child = real_popen([sys.executable, "-c", "pass"], **kw)
        seen["pid"] = child.pid
        return child

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    assert main(["tensorboard", f"{base}/tbexp", "--port", "6124"]) == 0
    assert seen["files"] == [f"{t}/search/tb/events.out.tfevents.1.host" for t in ("t1", "t2")]
    assert seen["cmd"][-2:] == ["--port", "6124"] and seen["logdir"].name.startswith("distsearch-tb-")
    assert not seen["logdir"].exists() and _stat(seen["pid"]) is None
    assert "deleted when TensorBoard ends" in capsys.readouterr().out
