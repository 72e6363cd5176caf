"""Commands for experiments on Ray: `distsearch run | resume | status | submit | tensorboard`.

`run` validates the experiment file and probes its storage before Ray starts (one line,
exit 2, on any problem), then starts a local Ray (no --address, no $RAY_ADDRESS) or joins
a cluster, and runs every trial to the end. `run` and `resume` hold the experiment's driver
lease (driver_lease.py: a second driver is refused). `resume URI` restores an interrupted
experiment; `status URI` prints one row per trial (state, metrics, genotype) and the live
driver, or where a single run stands (report.run_status, no Ray); `submit` sends `run` to a
cluster through the Ray Jobs SDK with the project as working_dir; `tensorboard URI` serves
the event files of all trials (from a temporary local copy when remote, deleted afterwards).
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from ..cli import add_config_args, check_data_here, refuse_inside_run
from ..driver_lease import LEASE_DIR, DriverLease
from ..errors import UsageError
from ..storage import Store
from . import locations as L
from . import tuner as T
from .status import INTERRUPTED, OPEN, STOPPED, print_table, trial_rows
from .trainable import SEARCH_DIR, experiment_of, trial_uri

FINISHED_FILE = "finished.json"  # written by the driver that saw every trial finish


def _need_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError:
        raise UsageError("Ray is not installed: pip install -e '.[ray]'") from None


def _finish(uri: str, terminated: bool = False, rows: list[dict[str, Any]] | None = None) -> int:
    rows = print_table(uri, rows)
    local = "://" not in uri
    print(f"trial folders: {uri}/<trial>/{SEARCH_DIR}/ (genotype.json, checkpoints/, tb/)")
    print(f"TensorBoard: {'tensorboard --logdir ' + uri if local else 'distsearch tensorboard ' + uri}")
    bad = [r["trial"] for r in rows if r["state"] == "ERROR"]
    if bad:
        print(f"{len(bad)} trial(s) errored ({', '.join(bad)}); continue: distsearch resume {uri}", file=sys.stderr)
        return 1
    open_ = [r["trial"] for r in rows if r["state"] in (*OPEN, INTERRUPTED)]
    if open_:  # Tune returns normally after Ctrl-C (and SIGTERM, _drive), leaving these
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"{what} with {len(open_)} trial(s) unfinished; continue: distsearch resume {uri}", file=sys.stderr)
        return 143 if terminated else 130
    if rows and not Store(uri).exists(FINISHED_FILE):  # a later `resume` prints this table without Ray
        Store(uri).write_json(FINISHED_FILE, {"time": time.time(), "trials": len(rows)})
    return 0


def _finished_rows(root: str) -> list[dict[str, Any]] | None:
    """The trial rows when a driver saw every trial of the experiment finish (FINISHED_FILE) and every
    trial's store still says so, else None: Tune's trial count alone cannot tell a finished
    experiment from one whose driver died before it created its last trials."""
    if not Store(root).exists(FINISHED_FILE):
        return None
    rows = trial_rows(root)
    return rows if rows and all(r["state"] in ("TERMINATED", STOPPED) for r in rows) else None


def _refuse_existing(spec: dict[str, Any]) -> None:
    store = Store(spec["root"])
    if store.exists(T.EXPERIMENT_FILE):
        raise UsageError(
            f"--name: {spec['root']} already holds an experiment; continue it with "
            f"`distsearch resume {spec['root']}` or choose another --name"
        )
    if store.exists("config.json"):
        raise UsageError(f"--name: {spec['root']} holds a single run (config.json); choose another --name or --storage")


def cmd_run(args: argparse.Namespace) -> int:
    from ..config_file import load_config

    cfg = load_config(args.config, args.overrides)
    spec = T.experiment_spec(cfg, args.storage, args.name)
    field = "--storage" if args.storage else "tune.storage"
    L.check_storage(spec["root"], field)
    if Store(spec["storage"], field=field).exists(T.EXPERIMENT_FILE):
        raise UsageError(f"{field}: {spec['storage']} is an experiment's root; give the folder that holds experiments")
    refuse_inside_run(Store(spec["root"], field=field), field)
    from ..data_npz import check_files

    check_files(cfg)  # before Ray starts, not in every trial
    check_data_here(cfg, search=True, strict=args.address is None)  # a local Ray's trials read it here
    _need_ray()
    args.out = spec["root"]  # for the interruption hint
    # a second `run` of this name (or a `resume`) is refused first, naming the live driver; a
    # refusal below leaves no folder
    with DriverLease(Store(spec["root"]), "run", "--name", _leased_trials(spec["root"])):
        _refuse_existing(spec)
        terminated = _drive(spec, args.address, lambda: T.build_tuner(spec))
    return _finish(spec["root"], terminated)


def _leased_trials(root: str) -> tuple[Store, ...]:
    """The trial stores under `root` that a process (`search --resume` on a trial) has a lease in."""
    base = Store(root)
    found = base.fs.glob(base.path("*", SEARCH_DIR, LEASE_DIR))
    return tuple(Store(trial_uri(root, posixpath.basename(posixpath.dirname(posixpath.dirname(p))))) for p in found)


def _not_tunes_resume_hint(record: logging.LogRecord) -> bool:
    return "Resume experiment with:" not in record.getMessage()


def _drive(spec: dict[str, Any], address: str | None, tuner: Any) -> bool:
    """Start or join Ray (an unreachable cluster or too few resources: refused, nothing written),
    save the experiment file on a first run, run `tuner()` to the end, and shut a local Ray down.
    A SIGTERM (a cluster's preemption) stops Tune as Ctrl-C does, its state saved (Ray's own
    handler dumped a stack and exited 1); returns whether one came."""
    started = T.start_ray(spec, address)
    terminated: list[int] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        terminated.append(signum)
        signal.raise_signal(signal.SIGINT)  # Tune's graceful stop

    main_thread = threading.current_thread() is threading.main_thread()
    kept = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    tune_log = logging.getLogger("ray.tune.tune")  # its "Resume experiment with: Tuner.restore(...)": ours names
    tune_log.addFilter(_not_tunes_resume_hint)  # `distsearch resume`, which also re-reads our spec
    try:
        if not Store(spec["root"]).exists(T.EXPERIMENT_FILE):
            T.save_spec(spec)
        tuner().fit()
    finally:
        tune_log.removeFilter(_not_tunes_resume_hint)
        if main_thread:
            signal.signal(signal.SIGTERM, kept if kept is not None else signal.SIG_DFL)
        if started:
            import ray

            ray.shutdown()
    return bool(terminated)


def cmd_resume(args: argparse.Namespace) -> int:
    from ..config_file import run_command
    from ..report import run_at

    store = Store(L.normalize_storage(args.uri), field="URI")
    trial = run_at(store)
    if trial is not None and (experiment := experiment_of(trial)) is not None:
        raise UsageError(
            f"URI: {args.uri} is a trial of an experiment; resume the experiment: `distsearch resume {experiment.uri}`"
        )
    if store.exists("config.json"):  # one run, not an experiment
        command = run_command(store.read_config())
        raise UsageError(
            f"URI: {args.uri} is a single {command} run, not an experiment; continue it with "
            f"`distsearch {command} --out {args.uri} --resume`"
        )
    _need_ray()
    spec = T.load_spec(args.uri)  # a clear error before Ray starts
    args.out = spec["root"]  # for the interruption hint
    with DriverLease(Store(spec["root"]), "resume", "URI", _leased_trials(spec["root"])):
        if (rows := _finished_rows(spec["root"])) is not None:
            print(f"{spec['root']}: every trial has finished; nothing to resume (Ray not started)")
            return _finish(spec["root"], rows=rows)
        terminated = _drive(spec, args.address, lambda: T.restore_tuner(args.uri)[0])
    return _finish(spec["root"], terminated)


def cmd_status(args: argparse.Namespace) -> int:
    uri = L.normalize_storage(args.uri)
    from ..report import run_at, run_status

    if (run := run_at(Store(uri))) is not None:  # one run (or a trial's folder): no Ray
        return run_status(run.uri)
    L.check_gcs_emulator(uri, "URI")  # an experiment's: one emulator variable without the other
    if not Store(uri).exists(T.EXPERIMENT_FILE):
        raise UsageError(
            f"URI: {args.uri!r} holds no run (no config.json or checkpoint) and no experiment (no "
            f"{T.EXPERIMENT_FILE}); give a search's or training's --out, or <storage>/<name> of a `distsearch run`"
        )
    _need_ray()
    rows = print_table(T.load_spec(args.uri)["root"])
    return 0 if rows else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from ..config_file import load_config

    cfg = load_config(args.config, args.overrides)
    spec = T.experiment_spec(cfg, args.storage, args.name)
    L.check_storage(spec["root"], "--storage" if args.storage else "tune.storage")
    _refuse_existing(spec)
    workdir = os.path.abspath(args.working_dir)
    rel = os.path.relpath(os.path.abspath(args.config), workdir)
    if rel.startswith(".."):
        raise UsageError(f"--config: {args.config} must lie inside --working-dir {workdir} (it is shipped with it)")
    if "://" not in spec["storage"]:
        print(
            f"note: storage {spec['storage']} is a local path: every node must see it (NFS); "
            "on a real cluster use s3:// or gs://",
            file=sys.stderr,
        )
    _need_ray()
    from ray.job_submission import JobStatus, JobSubmissionClient

    sets = " ".join(f"--set {shlex.quote(s)}" for s in args.overrides)
    entrypoint = (
        f"python -m distsearch.cli run --config {shlex.quote(rel)} --storage {shlex.quote(spec['storage'])} "
        f"--name {shlex.quote(spec['name'])} {sets}"
    ).strip()
    env = {k: os.environ[k] for k in (*L.FORWARD_ENV, "RAY_USAGE_STATS_ENABLED") if k in os.environ}
    runtime_env = {
        "working_dir": workdir,
        "env_vars": env,
        "excludes": [".git", "runs", "data", "*.egg-info", "__pycache__", ".venv", ".ruff_cache"],
    }
    try:
        client = JobSubmissionClient(args.address)
    except Exception as e:  # noqa: BLE001 - connection, auth and version errors alike
        raise UsageError(f"--address: cannot reach the Ray dashboard at {args.address} ({e})") from None
    job_id = _submit(client, entrypoint, runtime_env)
    print(f"submitted {job_id}: {entrypoint}")
    if not args.wait:
        print(f"follow: ray job logs --address {args.address} -f {job_id};  then: distsearch status {spec['root']}")
        return 0
    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in done:
        time.sleep(2)
    print(client.get_job_logs(job_id)[-4000:])
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def _submit(client: Any, entrypoint: str, runtime_env: dict[str, Any], wait_s: float = 120) -> str:
    """submit_job, retried on server errors while a freshly started head has no job agent yet."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as e:
            if "status code 5" not in str(e) or time.time() > deadline:  # 5xx: agent not up yet
                raise
            time.sleep(2)


def cmd_tensorboard(args: argparse.Namespace) -> int:
    """Serve TensorBoard on the event files at URI (a local folder in place; a remote one from a
    temporary copy, deleted when TensorBoard ends) until Ctrl-C or SIGTERM; its exit status."""
    spec_root = L.normalize_storage(args.uri)
    store = Store(spec_root, field="URI")
    if not store.exists():
        raise UsageError(f"URI: nothing at {args.uri!r}")
    if store.fs.isfile(store.root):
        raise UsageError(f"URI: {args.uri!r} is a file; give a run's --out or an experiment root")
    events = [p for p in store.fs.find(store.root) if "tfevents" in p.rsplit("/", 1)[-1]]
    if not events:  # not an empty board
        raise UsageError(
            f"URI: no TensorBoard event files under {args.uri!r}; give a run's --out or an experiment root"
        )
    logdir, copy = store.local_root, None
    try:
        if logdir is None:  # remote: copy the event files to a local folder first
            logdir = copy = tempfile.mkdtemp(prefix="distsearch-tb-")
            for path in events:
                rel = path[len(store.root) :].lstrip("/")
                os.makedirs(os.path.dirname(os.path.join(logdir, rel)), exist_ok=True)
                store.fs.get(path, os.path.join(logdir, rel))
            print(f"copied event files from {args.uri} to {logdir} (deleted when TensorBoard ends)")
        cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", args.host]
        cmd += ["--port", str(args.port)]
        print(f"TensorBoard on http://{args.host}:{args.port}  ({' '.join(cmd[2:])})")
        sys.stdout.flush()
        # its own session: a terminal's Ctrl-C reaches this process only, which passes it on once
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)

        def forward(signum: int, frame: Any) -> None:
            proc.send_signal(signum)

        kept = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            rc = proc.wait()
        finally:
            for s, handler in kept.items():
                signal.signal(s, handler)
            if proc.poll() is None:  # this process is ending for another reason: so does TensorBoard
                proc.kill()
                proc.wait()
        return rc if rc >= 0 else 128 - rc  # killed by signal N: 128 + N, as a shell reports it
    finally:
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run an experiment (its `tune:` section) as Ray Tune trials")
    add_config_args(p)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--storage", help="storage URI (overrides tune.storage): a path, file://, s3://, gs://")
    p.add_argument("--name", help="experiment name (default: the config's name)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("resume", help="continue an interrupted experiment at URI (<storage>/<name>)")
    p.add_argument("uri", help="an experiment root: <storage>/<name> (path, file://, s3://, gs://)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("status", help="table of the trials of the experiment at URI, or where one run stands")
    p.add_argument("uri", help="an experiment root <storage>/<name>, or a search's or training's --out")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("submit", help="submit `distsearch run` to a Ray cluster as a job (Ray Jobs SDK)")
    add_config_args(p)
    p.add_argument("--address", required=True, help="dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--storage", help="storage URI every node can reach (s3://, gs://, or a shared path)")
    p.add_argument("--name", help="experiment name (default: the config's name)")
    p.add_argument("--working-dir", default=".", help="project folder shipped as the job's working_dir")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its log tail")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("tensorboard", help="serve the TensorBoard files of an experiment or trial at URI")
    p.add_argument("uri", help="an experiment root, a trial's or a search's --out")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    p.add_argument("--port", type=_port, default=6006, help="1-65535 (default: %(default)s)")
    p.set_defaults(func=cmd_tensorboard)


def _port(text: str) -> int:
    import argparse

    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is a whole number 1-65535, got {text!r}")
    return int(text)
