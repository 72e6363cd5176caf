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
import os
import posixpath
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from ..cli import add_config_args
from ..driver_lease import LEASE_DIR, DriverLease, describe, live_drivers
from ..errors import UsageError
from ..storage import Store
from . import locations as L
from . import tuner as T
from .trainable import SEARCH_DIR, newest_progress, trial_uri


def _need_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError:
        raise UsageError("Ray is not installed: pip install -e '.[ray]'") from None


def _short_genotype(g: dict[str, Any] | None) -> str:
    if not g:
        return "-"

    def cell(edges: list[list[Any]]) -> str:
        return ",".join(f"{op}@{i}" for op, i in edges)

    return f"N[{cell(g['normal'])}] R[{cell(g['reduce'])}]"


def _starts(starts: list[dict[str, Any]]) -> str:
    """How often a trial (re)started and, after PBT exploits, from whom: '3 (<-00001@4)'."""
    exploits = [s for s in starts if s.get("checkpoint_from")]
    if not exploits:
        return str(len(starts))
    donor = posixpath.basename(posixpath.dirname(exploits[-1]["checkpoint_from"].rstrip("/")))
    return f"{len(starts)} (<-{donor}@{exploits[-1]['epoch']})"


def _where(starts: list[dict[str, Any]]) -> str:
    """Where a trial last ran: '127.0.0.1/cpu', '10.0.0.5/gpu0' (Ray's GPU ids), '-' before a start."""
    if not starts:
        return "-"
    last = starts[-1]
    ids, device = last.get("gpu_ids"), last.get("device")  # neither in a start recorded before they were
    on = "gpu" + ",".join(ids) if ids else device
    return f"{last.get('node_ip', '?')}/{on}" if on else last.get("node_ip", "?")


SHOWN = ("val/robust_clean_acc", "val/robust_acc")
ORPHANED = "ORPHANED"
STOPPED = "STOPPED"  # stopped early by the scheduler (ASHA): stopped.json
INTERRUPTED = "INTERRUPTED"  # unfinished, and no driver holds the experiment
OPEN = ("PENDING", "PAUSED", "RUNNING")


def trial_rows(uri: str) -> list[dict[str, Any]]:
    """One dict per trial of the experiment at `uri`: id, state, params, metrics, genotype.

    Tune's saved state (which lags the trials by up to its save period) gives the state and
    params; each trial's own store gives the epochs done and their metrics, and marks a trial
    finished once its result.json is written. A trial folder Tune's state does not know (it
    started after the last save of a driver that was then killed) is listed as ORPHANED:
    `resume` does not continue it. Unfinished trials are INTERRUPTED when no live driver
    holds the experiment (driver_lease.py)."""
    from ray.tune import ExperimentAnalysis

    spec = T.load_spec(uri)
    root = spec["root"]
    objectives = [m for m, _ in T.TuneConfig.model_validate(spec["tune"]).objectives]
    try:
        tune_trials = {t.trial_id: t for t in ExperimentAnalysis(root).trials}
    except (ValueError, FileNotFoundError, OSError):
        tune_trials = {}
    base = Store(root)
    folders = {
        posixpath.basename(posixpath.dirname(posixpath.dirname(p)))
        for p in base.fs.glob(base.path("*", SEARCH_DIR, "trial_starts.json"))
    }
    drivers = live_drivers(base)
    since = min((float(d["started"]) for d in drivers), default=None)
    rows = []
    for trial_id in [*tune_trials, *sorted(folders - set(tune_trials))]:
        trial = tune_trials.get(trial_id)
        store = Store(trial_uri(root, trial_id))
        starts = store.read_json("trial_starts.json", [])
        last = (trial.last_result or {}) if trial else {}
        epochs, record = newest_progress(store)
        if last.get("done_epochs", 0) > epochs:  # the store was pruned or damaged: trust Tune's report
            epochs, record = last["done_epochs"], last
        state = trial.status if trial else ORPHANED
        if state not in ("ERROR", ORPHANED) and store.exists("result.json"):
            state = "TERMINATED"  # finished; Tune's saved state may not say so yet
        elif state == "TERMINATED" and store.exists("stopped.json"):
            state = STOPPED
        elif state in OPEN and since is None:  # no driver; a `search --resume` may hold this trial's store
            state = "RUNNING" if live_drivers(store) else INTERRUPTED
        elif state == "PENDING" and since is not None and starts and starts[-1].get("time", 0) >= since:
            state = "RUNNING"  # started by the live driver; Tune's saved state lags by seconds
        rows.append(
            {
                "trial": trial_id,
                "state": state,
                "epochs": epochs,
                "starts": _starts(starts),
                "where": _where(starts),
                "params": trial.config if trial else (starts[0]["params"] if starts else {}),
                "metrics": record,
                "genotype": store.read_json("genotype.json", None),
            }
        )
    shown = objectives + [  # the PGD accuracy beside the objectives when the trials measure it
        m for m in SHOWN if m not in objectives and any(m in r["metrics"] for r in rows)
    ]
    for r in rows:
        record = r.pop("metrics")
        r.update({m: record.get(m) for m in shown})
    return rows


def print_table(uri: str) -> list[dict[str, Any]]:
    rows = trial_rows(uri)
    for lease in live_drivers(Store(uri)):
        print(f"running: {describe(lease)}")
    if not rows:
        print(f"{uri}: no trials recorded yet")
        return rows
    fixed = ("trial", "state", "epochs", "starts", "where")
    metrics = [k for k in rows[0] if k not in (*fixed, "params", "genotype")]
    head = [*fixed, *metrics, "params", "genotype"]
    table = [head]
    for r in rows:
        params = " ".join(f"{k}={v}" for k, v in r["params"].items())
        vals = [f"{r[m]:.4f}" if isinstance(r[m], float) else str(r[m]) for m in metrics]
        row = [*(str(r[k]) for k in fixed), *vals, params, _short_genotype(r["genotype"])]
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    if any(r["state"] == ORPHANED for r in rows):
        print(
            f"{ORPHANED}: a trial started after Tune last saved its state, before the driver was killed; "
            "`resume` does not continue it (Tune reruns its slot as a new trial); its files stay in its folder"
        )
    if any(r["state"] == STOPPED for r in rows):
        print(f"{STOPPED}: the scheduler ended these trials early (their metric was worse than their rung's cutoff)")
    if any(r["state"] == INTERRUPTED for r in rows):
        print(f"{INTERRUPTED}: no driver is running this experiment; continue it: distsearch resume {uri}")
    return rows


def _finish(uri: str) -> int:
    rows = print_table(uri)
    local = "://" not in uri
    print(f"trial folders: {uri}/<trial>/{SEARCH_DIR}/ (genotype.json, checkpoints/, tb/)")
    print(f"TensorBoard: {'tensorboard --logdir ' + uri if local else 'distsearch tensorboard ' + uri}")
    bad = [r["trial"] for r in rows if r["state"] == "ERROR"]
    if bad:
        print(f"{len(bad)} trial(s) errored ({', '.join(bad)}); continue: distsearch resume {uri}", file=sys.stderr)
        return 1
    open_ = [r["trial"] for r in rows if r["state"] in (*OPEN, INTERRUPTED)]
    if open_:  # Tune returns normally after Ctrl-C, leaving these
        print(f"interrupted with {len(open_)} trial(s) unfinished; continue: distsearch resume {uri}", file=sys.stderr)
        return 130
    return 0


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
    L.check_storage(spec["root"], "--storage" if args.storage else "tune.storage")
    from ..data_npz import check_files

    check_files(cfg)  # before Ray starts, not in every trial
    _need_ray()
    args.out = spec["root"]  # for the interruption hint
    # a second `run` of this name (or a `resume`) is refused first, naming the live driver; a
    # refusal below leaves no folder
    with DriverLease(Store(spec["root"]), "run", "--name", _leased_trials(spec["root"])):
        _refuse_existing(spec)
        _drive(spec, args.address, lambda: T.build_tuner(spec))
    return _finish(spec["root"])


def _leased_trials(root: str) -> tuple[Store, ...]:
    """The trial stores under `root` that a process (`search --resume` on a trial) has a lease in."""
    base = Store(root)
    found = base.fs.glob(base.path("*", SEARCH_DIR, LEASE_DIR))
    return tuple(Store(trial_uri(root, posixpath.basename(posixpath.dirname(posixpath.dirname(p))))) for p in found)


def _drive(spec: dict[str, Any], address: str | None, tuner: Any) -> None:
    """Start or join Ray (an unreachable cluster or too few resources: refused, nothing written),
    save the experiment file on a first run, run `tuner()` to the end, and shut a local Ray down."""
    started = T.start_ray(spec, address)
    try:
        if not Store(spec["root"]).exists(T.EXPERIMENT_FILE):
            T.save_spec(spec)
        tuner().fit()
    finally:
        if started:
            import ray

            ray.shutdown()


def cmd_resume(args: argparse.Namespace) -> int:
    from ..config_file import run_command

    store = Store(L.normalize_storage(args.uri), field="URI")
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
        _drive(spec, args.address, lambda: T.restore_tuner(args.uri)[0])
    return _finish(spec["root"])


def cmd_status(args: argparse.Namespace) -> int:
    uri = L.normalize_storage(args.uri)
    for run in (uri, posixpath.join(uri, SEARCH_DIR)):  # one run (or a trial's folder): no Ray
        if Store(run).exists("config.json"):
            from ..report import run_status

            return run_status(run)
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
    logdir, copy = store.local_root, None
    try:
        if logdir is None:  # remote: copy the event files to a local folder first
            logdir = copy = tempfile.mkdtemp(prefix="distsearch-tb-")
            for path in store.fs.find(store.root):
                if "tfevents" in path.rsplit("/", 1)[-1]:
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
    p.add_argument("--port", type=int, default=6006, help="(default: %(default)s)")
    p.set_defaults(func=cmd_tensorboard)
