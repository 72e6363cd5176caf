"""An experiment as a Ray Tune run: param_space from the `tune:` section (choice, grid,
uniform, loguniform over dotted config keys), the search algorithm (Optuna TPE, Optuna
NSGA-II over several metrics, or random/grid), the scheduler (ASHA, PBT, FIFO), per-trial
resources (CPUs, a GPU fraction), storage by URI, and resume with
`Tuner.restore(..., resume_errored=True)` (finished trials stay finished; errored and
unfinished ones continue from their own checkpoints; Optuna keeps its state).

Storage URIs (a local path, file://, s3://, gs://) and the settings trials need to reach them:
locations.py. The experiment lives at `<storage>/<name>/`: Tune's state,
`distsearch_experiment.json` (what `resume` needs), and one folder per trial (see trainable.py).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import socket
import sys
import time
from typing import Any

from ..config import SearchConfig, local_path
from ..errors import UsageError
from ..storage import Store
from .locations import FORWARD_ENV, check_gcs_emulator, normalize_storage
from .schema import ParamSpec, TuneConfig
from .trainable import EXPERIMENT_FILE, SEARCH_DIR, search_trial

log = logging.getLogger(__name__)


def _domain(spec: ParamSpec) -> Any:
    from ray import tune

    kind = spec.kind
    if kind == "choice":
        return tune.choice(spec.choice)
    if kind == "grid":
        return tune.grid_search(spec.grid)
    lo, hi = getattr(spec, kind)
    return tune.uniform(lo, hi) if kind == "uniform" else tune.loguniform(lo, hi)


def param_space(t: TuneConfig) -> dict[str, Any]:
    return {key: _domain(spec) for key, spec in t.params.items()}


def search_algorithm(t: TuneConfig, seed: int) -> Any:
    if t.search_alg == "random":  # Tune's BasicVariantGenerator: random sampling and grids, seeded
        from ray.tune.search import BasicVariantGenerator

        limit = t.max_concurrent_trials or 0  # its own: Tune ignores TuneConfig's limit for this one
        return BasicVariantGenerator(points_to_evaluate=t.points_to_evaluate, max_concurrent=limit, random_state=seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if t.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed)
        metric, mode = [m for m, _ in t.objectives], [m for _, m in t.objectives]
        return OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=t.points_to_evaluate)
    sampler = optuna.samplers.TPESampler(seed=seed)
    return OptunaSearch(sampler=sampler, points_to_evaluate=t.points_to_evaluate)


def scheduler(t: TuneConfig, epochs: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    metric, mode = t.objectives[0]
    # rungs and perturbation intervals count the epochs a trial's store holds: after a resume
    # Tune's training_iteration lags them by the epochs run since Tune last saved its state
    if t.scheduler == "asha":
        extra = {"metric": metric, "mode": mode} if t.metrics else {}
        return ASHAScheduler(
            time_attr="done_epochs",
            max_t=epochs,
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
            **extra,
        )
    if t.scheduler == "pbt":
        mutations = {}
        for key, spec in t.params.items():
            lo_hi = spec.uniform or spec.loguniform
            mutations[key] = (
                list(spec.choice or spec.grid)
                if lo_hi is None
                else (tune.uniform(*lo_hi) if spec.uniform else tune.loguniform(*lo_hi))
            )
        return _pbt_class()(
            time_attr="done_epochs",
            perturbation_interval=t.perturbation_interval,
            quantile_fraction=t.quantile_fraction,
            synch=t.synch,
            hyperparam_mutations=mutations,
        )
    return FIFOScheduler()


def _pbt_class() -> type:
    """PopulationBasedTraining without a stale STOP after an exploit (Ray 2.60). Exploiting a trial
    whose save is still in flight (synch mode: it reported first and is being paused) makes
    TuneController._schedule_trial_stop cache a STOP for it; the save's future goes with the actor,
    so nothing consumes that STOP until the restarted trial's first checkpoint, which then ends the
    trial ("completed" after one more epoch, its function still running; 2 runs in 9 of the PBT test
    on 2 busy cores). A restarted trial never holds a decision of its previous actor: dropped."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    class PBT(PopulationBasedTraining):
        def _exploit(self, tune_controller: Any, trial: Trial, trial_to_clone: Trial) -> None:
            super()._exploit(tune_controller, trial, trial_to_clone)
            cached = getattr(tune_controller, "_cached_trial_decisions", {})
            if trial.status == Trial.PAUSED and cached.get(trial.trial_id) == TrialScheduler.STOP:
                del cached[trial.trial_id]
                log.info("PBT: dropped the STOP Tune cached for %s while pausing it to exploit", trial.trial_id)

    return PBT


def stop_marker(spec: dict[str, Any]) -> Any:
    """A Tune callback that writes stopped.json into the store of a trial the scheduler stops
    early (ASHA), so that `status` and `report` say so instead of calling it unfinished. Tune
    marks the result it stops a trial on with done=True; a trial's last own report (all epochs)
    is never such a result, and an interrupted trial gets none. Tune pickles this callback with
    the experiment and restores it unchanged, so the trial's folder comes from Tune's trial
    (where the experiment is now), not from `spec`."""
    from ray.tune import Callback

    epochs, t = spec["base"]["epochs"], TuneConfig.model_validate(spec["tune"])
    scheme = spec["root"].split("://")[0] + "://" if "://" in spec["root"] else ""

    class StopMarker(Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            done = result.get("done_epochs", epochs)
            if result.get("done") and done < epochs:
                metric = t.objectives[0][0]
                local = trial.storage.storage_filesystem.type_name == "local"
                Store(posixpath.join(trial.path if local else scheme + trial.path, SEARCH_DIR)).write_json(
                    "stopped.json",
                    {"scheduler": t.scheduler, "epoch": done, "metric": metric, "value": result.get(metric)},
                )

    return StopMarker()


def trial_dirname(trial: Any) -> str:
    return trial.trial_id


def make_trainable(spec: dict[str, Any]) -> Any:
    from ray import tune

    r = spec["resources"]
    return tune.with_resources(tune.with_parameters(search_trial, spec=spec), {"cpu": r["cpu"], "gpu": r["gpu"]})


def experiment_spec(cfg: SearchConfig, storage: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Everything a run or a later resume needs, as JSON: the base config and the tune section."""
    if cfg.tune is None:
        raise UsageError("tune: the experiment file has no `tune:` section (see launch/experiments/quickstart.yaml)")
    storage = normalize_storage(storage or cfg.tune.storage)
    field, name = ("--name", name) if name else ("name", cfg.name)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name or ""):
        raise UsageError(
            f"{field}: {name!r} must be a plain folder name (letters, digits, '_', '-', '.'; not starting with '.')"
        )
    tune = cfg.tune.model_dump(mode="json")
    for key in ("data.root", "data.path"):  # the base's are absolute (DataConfig); sampled ones too
        spec = tune["params"].get(key) or {}
        for kind in ("choice", "grid"):
            if spec.get(kind):
                spec[kind] = [local_path(p) if isinstance(p, str) else p for p in spec[kind]]
    return {
        "name": name,
        "storage": storage,
        "root": posixpath.join(storage, name),
        "base": cfg.model_dump(mode="json", exclude={"tune"}),
        "tune": tune,
        "resources": cfg.tune.resources.model_dump(),
        "cpu": cfg.tune.resources.cpu,
        "env": {k: os.environ[k] for k in FORWARD_ENV if k in os.environ},
    }


def build_tuner(spec: dict[str, Any], verbose: int = 1) -> Any:
    """A new Tuner for the experiment `spec` (see experiment_spec); `verbose` as Tune's (0 silent)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    t = TuneConfig.model_validate(spec["tune"])
    metric, mode = (None, None) if t.metrics else t.objectives[0]
    seed = t.seed if t.seed is not None else spec["base"]["seed"]
    tune_config = tune.TuneConfig(
        metric=metric,
        mode=mode,
        search_alg=search_algorithm(t, seed),
        scheduler=scheduler(t, spec["base"]["epochs"]),
        num_samples=t.num_samples,
        max_concurrent_trials=None if t.search_alg == "random" else t.max_concurrent_trials,
        trial_dirname_creator=trial_dirname,
        trial_name_creator=trial_dirname,
        # reusing a finished trial's worker saves a second torch import; not under PBT, whose pauses
        # and exploits hand workers between live trials (a trial once ended early, "completed", there)
        reuse_actors=t.reuse_actors and t.scheduler != "pbt",
    )
    # Of Tune's own loggers only result.json (ExperimentAnalysis, so `status`, and Tuner.restore
    # read it first): not its TensorBoard files beside ours (TensorBoard on an experiment root
    # would show each trial twice), nor progress.csv, whose columns are a trial's first result's
    # keys: a trial restarted with other keys (PBT mutating weight_at.strategy) writes its rows
    # under the wrong headers. The restored RunConfig keeps these callbacks (restore_tuner).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    run_config = tune.RunConfig(
        name=spec["name"],
        storage_path=spec["storage"],
        # Tune checkpoints are pointer files of a few bytes (the searches' own checkpoints are pruned by
        # storage.keep), all kept: Tune's saved state lags the trials by seconds, and a resume after the
        # driver was killed failed when it named one deleted since ("does not exist on storage
        # anymore", seen on gs://); PBT clones donors' older ones too
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        failure_config=tune.FailureConfig(max_failures=t.max_failures),
        callbacks=[stop_marker(spec), JsonLoggerCallback()],
        verbose=verbose,
    )
    return tune.Tuner(make_trainable(spec), param_space=param_space(t), tune_config=tune_config, run_config=run_config)


def save_spec(spec: dict[str, Any]) -> None:
    Store(spec["root"]).write_json(EXPERIMENT_FILE, spec)


def load_spec(uri: str) -> dict[str, Any]:
    uri = normalize_storage(uri)
    check_gcs_emulator(uri, "URI")  # before Ray (resume) or Tune's state (status) is asked
    store = Store(uri)
    if not store.exists(EXPERIMENT_FILE):
        raise UsageError(
            f"URI: {uri!r} holds no distsearch experiment (no {EXPERIMENT_FILE}); "
            "point it at <storage>/<name> of a `distsearch run`"
        )
    spec = store.read_json(EXPERIMENT_FILE)
    if spec["root"] != uri:  # copied or moved since `run`: read and resume the files that are here
        spec.update(root=uri, storage=posixpath.dirname(uri), name=posixpath.basename(uri))
    return spec


def restore_tuner(uri: str) -> tuple[Any, dict[str, Any]]:
    """The experiment at `uri`, restored: unfinished and errored trials continue, finished ones stay."""
    from ray import tune

    spec = load_spec(uri)
    if not tune.Tuner.can_restore(spec["root"]):
        raise UsageError(f"URI: {spec['root']!r} has no Tune experiment state to resume (did it ever start?)")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # build_tuner's loggers come back with the state
    tuner = tune.Tuner.restore(spec["root"], trainable=make_trainable(spec), resume_errored=True)
    return tuner, spec


def _probe(address: str, timeout: float = 5.0) -> None:
    """A UsageError unless a Ray GCS (HOST:PORT) or Ray client server (ray://HOST:PORT) answers
    at `address`: Ray itself would print a traceback (ray://) or wait on the GCS for a minute,
    and forever where another service (a dashboard, a web server) holds the port. Both are gRPC
    over cleartext HTTP/2, so after the TCP connect the HTTP/2 client preface must be answered
    with a SETTINGS frame (not checked where RAY_USE_TLS is set: TLS comes first there). Any gRPC
    server passes that, so a GCS address must then answer a real GCS call (`_ask_gcs`)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address: {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as e:
        raise UsageError(
            f"--address: nothing answers at {hostport} ({e.strerror or e}); start the cluster "
            "(`ray start --head` or `ray up cluster.yaml`) or leave --address out to run on a local Ray"
        ) from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return
        reply = b""
        try:  # the preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0)
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            while len(reply) < 9:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
        except OSError as e:  # socket.timeout included
            what = f"no HTTP/2 reply within {timeout:g} s" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        else:
            what = f"it replied {reply[:9]!r}" if reply else "it closed the connection"
        if len(reply) < 9 or reply[3] != 0x04:
            if address.startswith("ray://"):
                kind, usual = "client server (ray://)", "the client port is usually 10001 (--ray-client-server-port)"
            else:
                kind, usual = "cluster (GCS)", "the GCS port is usually 6379 (ray start --head prints it)"
            raise UsageError(
                f"--address: {hostport} answers but is not a Ray {kind} address ({what}, not gRPC); "
                f"{usual}; the dashboard 8265 is for distsearch submit"
            )
    if not address.startswith("ray://"):
        _ask_gcs(hostport, max(deadline - time.monotonic(), 0.5))


def _ask_gcs(hostport: str, timeout: float) -> None:
    """A UsageError unless the Ray GCS at `hostport` answers GetClusterId, the first call ray.init
    makes (and retries for ever where another gRPC server, e.g. the client port 10001, answers).
    It sends the token Ray itself would: with RAY_AUTH_MODE=token, from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    import grpc

    interceptors = []
    try:
        from ray._private.authentication.grpc_authentication_client_interceptor import (
            SyncAuthenticationMetadataClientInterceptor,
        )

        interceptors.append(SyncAuthenticationMetadataClientInterceptor())
    except ImportError:  # a Ray without token authentication
        pass
    proxy = int(os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() in ("1", "true"))  # as Ray's clients
    options = [("grpc.enable_http_proxy", proxy), ("grpc.use_local_subchannel_pool", 1)]  # closed with the channel
    with grpc.insecure_channel(hostport, options=options) as channel:
        call = grpc.intercept_channel(channel, *interceptors).unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=timeout)  # b"": an empty GetClusterIdRequest; the reply is not needed
            return
        except grpc.RpcError as e:
            code, details = e.code(), ((e.details() or "").splitlines() or [""])[0]
    if code == grpc.StatusCode.UNIMPLEMENTED:
        raise UsageError(
            f"--address: {hostport} answers gRPC but is not a Ray GCS (no NodeInfoGcsService); the GCS port "
            f"is usually 6379 (ray start --head prints it); a Ray client server (port 10001) needs ray://{hostport}"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        raise UsageError(
            f"--address: the Ray GCS at {hostport} uses token authentication and refused this process ({details}); "
            "set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token (`ray get-auth-token` on the head node prints it)"
        )
    what = f"no reply within {timeout:g} s" if code == grpc.StatusCode.DEADLINE_EXCEEDED else f"{code.name}: {details}"
    raise UsageError(f"--address: {hostport} answers gRPC but a Ray GCS call to it failed ({what})")


def init_ray(address: str | None = None) -> bool:
    """Connect to `address` (or $RAY_ADDRESS), or start a local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # "local": a new Ray even where /tmp/ray/ray_current_cluster names another (or a dead) one
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
        return True
    if address != "auto":
        _probe(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise UsageError(f"--address: cannot join the Ray cluster at {address} ({str(e).splitlines()[0]})") from None
    return True


def check_resources(per_trial: dict[str, float], cluster: dict[str, float], local: bool) -> str | None:
    """A trial that asks for more CPUs or GPUs than the cluster has would wait forever: a
    UsageError on a local Ray; a warning (returned) on a cluster, where an autoscaler may add nodes."""
    for key, field in (("cpu", "CPU"), ("gpu", "GPU")):
        want, have = per_trial.get(key, 0), cluster.get(field, 0)
        if want > have:
            where = "this machine" if local else "the cluster (now)"
            msg = f"tune.resources.{key}: each trial asks for {want} {field} but {where} has {have:g}"
            if local:
                fix = "set tune.resources.gpu: 0 (and device: cpu)" if key == "gpu" else f"set it to at most {have:g}"
                raise UsageError(f"{msg}; {fix}")
            return f"warning: {msg}; trials stay PENDING until a node with enough joins"
    return None


def start_ray(spec: dict[str, Any], address: str | None) -> bool:
    """init_ray, then check_resources for the experiment's trials (Ray shut down again on refusal)."""
    import ray

    started = init_ray(address)
    local = started and not (address or os.environ.get("RAY_ADDRESS"))
    try:
        warning = check_resources(spec["resources"], ray.cluster_resources(), local)
    except UsageError:
        if started:
            ray.shutdown()
        raise
    if warning:
        print(warning, file=sys.stderr)
    return started
