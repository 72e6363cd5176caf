"""`distsearch status` of an experiment: one row per trial (state, epochs, starts, where it ran,
metrics, params, genotype) from Tune's saved state and each trial's own store, and the live driver.
"""

from __future__ import annotations

import posixpath
from typing import Any

from ..driver_lease import describe, live_drivers
from ..storage import Store
from . import tuner as T
from .trainable import SEARCH_DIR, newest_progress, trial_uri


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


def print_table(uri: str, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Print the status table of the experiment at `uri` (its trial_rows, unless given) and return the rows."""
    rows = trial_rows(uri) if rows is None else rows
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
