"""The Ray Tune function trainable: one trial = one search (`runner.run_search`).

Each trial keeps its own Store at `<storage>/<experiment>/<trial_id>/search/` (config,
checksummed checkpoints, genotype.json, result.json, tb/), next to the files Tune writes in
the same trial folder. After every epoch's checkpoint the trial reports that epoch's
metrics with `ray.tune.report(metrics, checkpoint=...)`; the Tune checkpoint is a small
pointer to the search checkpoint in the store. Resuming a trial needs nothing from Tune:
run_search continues from the newest valid checkpoint in the trial's own store (which
may be newer than Tune's saved state). When a Tune checkpoint points at another trial's
store (PBT exploit), that checkpoint is copied into this trial's store first.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import time
from typing import Any

from ..storage import CKPT_DIR, MANIFEST, Store
from .schema import apply_params

SEARCH_DIR = "search"
EXPERIMENT_FILE = "distsearch_experiment.json"  # in the experiment root: what `resume` needs
POINTER = "distsearch_checkpoint.json"


def trial_uri(root: str, trial_id: str) -> str:
    """Storage URI of one trial's search Store under the experiment root URI."""
    return posixpath.join(root.rstrip("/"), trial_id, SEARCH_DIR)


def experiment_of(store: Store) -> Store | None:
    """The experiment root holding `store` when it is a trial's store (trial_uri's inverse), else None."""
    if posixpath.basename(store.root) != SEARCH_DIR:
        return None
    root = posixpath.dirname(posixpath.dirname(store.root))
    protocol = store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]
    root_store = Store(root if store.is_local else f"{protocol}://{root}")
    return root_store if root_store.exists(EXPERIMENT_FILE) else None


def set_threads(cpus: float) -> int:
    """torch intra-op and OMP threads from the trial's CPU share (at least one)."""
    import torch

    n = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def pointed_store(pointer: dict[str, Any], root: str) -> str:
    """The store a Tune pointer checkpoint names, under the experiment's current `root`: pointers
    hold the trial id (older ones a full URI, whose trial folder is used), so an experiment copied
    or moved elsewhere resumes from its own files, not the original's."""
    trial = pointer.get("trial") or posixpath.basename(posixpath.dirname(pointer["store"].rstrip("/")))
    return trial_uri(root, trial)


def _adopt(source: str, pointer: dict[str, Any], store: Store) -> str:
    """Copy the pointed-at checkpoint (another trial's, under PBT) from `source` into `store`;
    returns the name of the checkpoint the trial resumes from."""
    if source == store.uri:
        return pointer["checkpoint"]
    src = Store(source)
    name, committed = pointer["checkpoint"], src.list_checkpoints()
    if name not in committed:  # pruned by the donor since (storage.keep): its newest one instead
        if not committed:
            raise RuntimeError(f"PBT: the donor {source} holds no checkpoint to clone")
        name = committed[-1]
    rel = posixpath.join(CKPT_DIR, name)
    manifest = src.read_json(posixpath.join(rel, MANIFEST))
    for old in store.list_checkpoints():  # the clone replaces this trial's own history, files too
        store.fs.rm(store.path(CKPT_DIR, old, MANIFEST))  # uncommitted first
        store.fs.rm(store.path(CKPT_DIR, old), recursive=True)
    for fname in manifest["files"]:
        store.write_bytes(posixpath.join(rel, fname), src.read_bytes(posixpath.join(rel, fname)))
    store.write_json(posixpath.join(rel, MANIFEST), manifest)
    return name


def newest_progress(store: Store) -> tuple[int, dict[str, Any]]:
    """(epoch, that epoch's metrics) from the meta.json of a trial store's newest committed
    checkpoint, unverified (for display); (0, {}) before the first."""
    names = store.list_checkpoints()
    meta = store.read_json(posixpath.join(CKPT_DIR, names[-1], "meta.json"), {}) if names else {}
    return meta.get("epoch", 0), (meta.get("history") or [{}])[-1]


def _record_start(
    store: Store, node_ip: str, params: dict[str, Any], source: str | None, gpu_ids: list[str], device: str, **more: Any
) -> None:
    """Append this start to trial_starts.json: the epoch it resumes from, the node it runs on, the
    GPUs Ray gave it and the device it runs on, the sampled params it runs with and, after a PBT
    exploit, the store its checkpoint came from; `more`: the Tune checkpoint it was handed and
    the epochs it runs to."""
    starts = store.read_json("trial_starts.json", [])
    epoch = newest_progress(store)[0]  # informational: run_search verifies and loads
    starts.append(
        {
            "time": time.time(),
            "epoch": epoch,
            "node_ip": node_ip,
            "pid": os.getpid(),
            "gpu_ids": gpu_ids,
            "device": device,
            "params": params,
            "checkpoint_from": source,
            **more,
        }
    )
    store.write_json("trial_starts.json", starts)


def _write_genotype(store: Store, name: str, record: dict[str, float], final: bool) -> None:
    """genotype.json after every epoch (a scheduler may stop the trial at any report), and at
    the last epoch also result.json, as run_search writes them when it is not interrupted."""
    meta = store.read_json(posixpath.join(CKPT_DIR, name, "meta.json"))
    store.write_json("genotype.json", meta["genotype"])
    if final:
        result = dict(genotype=meta["genotype"], metrics=record, epochs=meta["epoch"], steps=meta["global_step"])
        store.write_json("result.json", result)


def search_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """Tune entry point. `config` holds the sampled dotted keys; `spec` the experiment
    (`base`: the raw search config, `root`: the experiment's storage URI, `cpu`: per trial)."""
    import ray
    from ray import tune

    from ..config_file import parse_config
    from ..runner import resolve_device, run_search

    ctx = tune.get_context()
    for key, value in spec.get("env", {}).items():  # storage endpoint etc.; the node's own setting wins
        os.environ.setdefault(key, value)
    threads = set_threads(spec.get("cpu", 1))
    raw = apply_params(spec["base"], config)
    uri = trial_uri(spec["root"], ctx.get_trial_id())
    raw.update(threads=threads, name=f"{raw.get('name', 'search')}/{ctx.get_trial_id()}")
    raw.setdefault("storage", {})["uri"] = uri
    raw.setdefault("monitor", {})["progress"] = False
    if not spec.get("resources", {}).get("gpu") and raw.get("device", "auto") == "auto":
        # Ray (2.60) leaves CUDA_VISIBLE_DEVICES as it is for a trial that asked for no GPU: `auto`
        # would take GPU 0 beside the trials Ray gave it to
        raw["device"] = "cpu"
    cfg = parse_config(raw)
    store = Store(uri)

    checkpoint, source, handed = tune.get_checkpoint(), None, None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            pointer_file = os.path.join(d, POINTER)
            if os.path.exists(pointer_file):
                with open(pointer_file) as f:
                    pointer = json.load(f)
                donor = pointed_store(pointer, spec["root"])
                handed = _adopt(donor, pointer, store)
                source = None if donor == uri else donor
        store.write_json("config.json", cfg.model_dump(mode="json"))  # PBT may have changed the config
    if store.exists("stopped.json"):  # a scheduler's stop the driver did not live to save: running again
        store.fs.rm(store.path("stopped.json"))
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    node, device = ray.util.get_node_ip_address(), str(resolve_device(cfg.device))
    _record_start(store, node, dict(config), source, gpu_ids, device, checkpoint=handed, epochs=cfg.epochs)
    reported = False
    # An objective (tune.metric / metrics) only another sampled algorithm reports, e.g. train/R_jac
    # in a darts trial, is NaN here: Tune refuses a result without it; ASHA and PBT pass NaN by,
    # Optuna records such a trial as failed.
    t = spec["tune"]
    objectives = dict.fromkeys(t.get("metrics") or [t["metric"]], float("nan"))

    def on_epoch(epoch: int, record: dict[str, float], name: str) -> None:
        nonlocal reported
        _write_genotype(store, name, record, final=epoch >= cfg.epochs)
        with tempfile.TemporaryDirectory(prefix="distsearch-ckpt-") as d:
            with open(os.path.join(d, POINTER), "w") as f:
                json.dump({"trial": ctx.get_trial_id(), "checkpoint": name, "epoch": epoch}, f)
            tune.report({**objectives, **record, "done_epochs": epoch}, checkpoint=tune.Checkpoint.from_directory(d))
        reported = True

    # a restored trial runs on with the config PBT mutated (its data is still checked)
    result = run_search(cfg, store, on_epoch=on_epoch, config_may_change=checkpoint is not None)
    starts = store.read_json("trial_starts.json", [])  # how this start ended: Tune's "completed" says less
    starts[-1]["returned_at_epoch"] = result.epochs
    store.write_json("trial_starts.json", starts)
    if not reported:  # the store already held the finished search: report its result once
        tune.report({**objectives, **result.metrics, "done_epochs": result.epochs})
