"""`distsearch report URI`: one Markdown page, with plots, of what storage holds (the last box
of ../shared/DESIGN.md's flow). URI is a search or training store, or an experiment root of
`distsearch run` (a summary table of the trials, then one section per trial). Per run: the
config in brief, the final metrics (accuracies in %, like the eval/ and certify/ tables), the
loss and accuracy curves (robust ones too) from the newest checkpoint's history, the genotype
searched or trained (JSON and cell drawings), for searches the softmax(alpha) heatmaps; tables
that `evaluate` / `certify` wrote beside the run are included. Reads JSON and weights_only checkpoints only.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from typing import Any

from .distributed.trainable import SEARCH_DIR  # layout only: no ray imported
from .errors import UsageError, out_folder
from .storage import CKPT_DIR, Latest, Store

TABLES = (("eval", "robustness.md", "robustness.png"), ("certify", "certified.md", "certified.png"))


def holds_run(store: Store) -> bool:
    """A run's folder: its config.json, or (deleted by hand) a checkpoint that records its config."""
    return store.exists("config.json") or bool(store.list_checkpoints())


def run_at(store: Store) -> Store | None:
    """The run at `store`, or at its search/ when it is an experiment's trial folder; None if neither."""
    return next(
        (s for s in (store, Store(posixpath.join(store.uri, SEARCH_DIR), field=store.field)) if holds_run(s)), None
    )


def _stores(uri: str) -> list[tuple[str, Store]]:
    """(label, store) for a run at `uri`, or for every trial under an experiment root."""
    store = Store(uri, field="URI")
    if (run := run_at(store)) is not None:
        return [(posixpath.basename(store.root), run)]
    found = {posixpath.dirname(p) for p in store.fs.glob(store.path("*", SEARCH_DIR, "config.json"))}
    found |= {posixpath.dirname(p) for p in store.fs.glob(store.path("*", SEARCH_DIR, CKPT_DIR))}
    if not found:
        raise UsageError(f"URI: {uri!r} holds no run (no config.json) and no experiment trials (*/search/)")
    runs = []
    for search in sorted(found):
        runs.append(
            (posixpath.basename(posixpath.dirname(search)), Store(store.uri.rstrip("/") + search[len(store.root) :]))
        )
    return runs


def _value(key: str, value: float) -> str:
    """Accuracies (fractions in the stores) in %, like the eval/ and certify/ tables."""
    from .plots import ACC

    return f"{100 * value:.2f}" if ACC.search(key) else f"{value:.4g}"


Read = tuple[dict[str, Any], dict[str, Any] | None, Latest, dict[str, Any] | None]


def _read(store: Store) -> Read:
    """A run's config (config.json, or when that was deleted its newest valid checkpoint's record),
    its result.json once it finished, that checkpoint, and stopped.json when an experiment's
    scheduler ended it early (distributed/tuner.stop_marker)."""
    from .runner import recorded_config

    latest = store.load_latest()
    if store.exists("config.json"):
        config = store.read_config()
    else:
        config = recorded_config(latest)
        if config is None:
            raise UsageError(f"URI: {store.uri} holds no config.json and no valid checkpoint that records its config")
    return config, store.read_json("result.json", None), latest, store.read_json("stopped.json", None)


def _data(store: Store, config: dict[str, Any]) -> tuple[str, str | None]:
    """('npz at /a/b.npz', '975 training and 225 test images of 1x28x28, 10 classes (sha256 …)'):
    the data set a run reads, and what it was made on (its data.json; None before data.json)."""
    from .data import describe, located
    from .runner import DATA_FILE, DATA_KEYS

    d = config.get("data") or {}
    made_on = store.read_json(DATA_FILE, None, DATA_KEYS)
    return located(d.get("name", "mnist5k"), d.get("root"), d.get("path")), describe(made_on) if made_on else None


def _headline(
    result: dict[str, Any] | None, latest: Latest, stopped: dict[str, Any] | None
) -> tuple[dict[str, Any], str]:
    """(metrics, epochs): the result's, or an unfinished or stopped run's newest checkpoint's."""
    meta = latest[2] if latest else {}
    if result:
        return result.get("metrics") or {}, str(result.get("epochs", ""))
    why = f"stopped by {stopped['scheduler']}" if stopped else "unfinished"
    return (meta.get("history") or [{}])[-1], f"{meta.get('epoch', 0)} ({why})"


def _section(label: str, store: Store, read: Read, folder: str) -> list[str]:
    from search_spaces import Genotype
    from search_spaces.operations import PRIMITIVES

    from . import plots

    config, result, latest, stopped = read
    algo = (config.get("algorithm") or {}).get("name")
    what = f"search ({algo})" if algo else "training"
    where, made_on = _data(store, config)
    lines = [
        f"## {label}",
        "",
        f"`{store.uri}` — {what} on {where}, {config['epochs']} epoch{'s' * (config['epochs'] != 1)}",
        "",
    ]
    lines += [f"Data: {made_on}.", ""] if made_on else []
    meta = latest[2] if latest else {}
    metrics = _headline(result, latest, stopped)[0]
    if result:
        state = "finished"
    elif stopped:
        by, metric = stopped["scheduler"].upper(), stopped["metric"]
        state = f"stopped early by {by} after epoch {stopped['epoch']} ({metric} worse than its rung's cutoff)"
    else:
        state = f"at epoch {meta.get('epoch', 0)} (unfinished)"
    lines += [f"State: {state}.", ""]
    if metrics:
        lines += ["| metric | value (accuracies in %) |", "|---|---|"]
        lines += [f"| {k} | {_value(k, v)} |" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
        lines.append("")
    if meta.get("history"):
        name = f"{label}_curves.png"
        plots.save(plots.curves(meta["history"], label), os.path.join(folder, name))
        lines += [f"![curves]({name})", ""]
    # a search's derived genotype, or the genotype a training run trained (its checkpoint's record;
    # genotype.json for checkpoints older than the record)
    trained = (meta.get("run") or {}).get("genotype")
    genotype = (
        meta.get("genotype") or trained or (result or {}).get("genotype") or store.read_json("genotype.json", None)
    )
    if genotype:
        g = Genotype.from_dict(genotype)
        head = "Genotype (searched):" if algo else "Genotype (trained):"
        lines += [head, "", "```json", json.dumps(genotype), "```", ""]
        for kind in ("normal", "reduce"):
            name = f"{label}_{kind}.png"
            plots.save(plots.draw_cell(g, reduce=kind == "reduce"), os.path.join(folder, name))
            lines.append(f"![{kind} cell]({name})")
        lines.append("")
    model_state = (latest[1].get("searcher") or {}).get("model", {}) if latest else {}
    if "alphas_normal" in model_state:
        ops = list((config.get("space") or {}).get("ops") or PRIMITIVES)
        for kind in ("normal", "reduce"):
            w = model_state[f"alphas_{kind}"].float().softmax(-1).numpy()
            name = f"{label}_alpha_{kind}.png"
            plots.save(plots.alpha_heatmap(w, ops, f"{label}: softmax(alpha_{kind})"), os.path.join(folder, name))
            lines.append(f"![alpha {kind}]({name})")
        lines.append("")
    for sub, table, image in TABLES:
        if store.exists(posixpath.join(sub, table)):
            lines += [f"From `{sub}/` (accuracies in %):", "", store.read_bytes(posixpath.join(sub, table)).decode()]
            if store.exists(posixpath.join(sub, image)):
                name = f"{label}_{image}"
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(store.read_bytes(posixpath.join(sub, image)))
                lines += [f"![{sub}]({name})", ""]
    return lines


# robust_clean_acc: the clean accuracy of the examples robust_acc attacks (the first eval.n)
SUMMARY = (
    "val/acc",
    "val/robust_clean_acc",
    "val/robust_acc",
    "test/acc",
    "test/robust_clean_acc",
    "test/robust_acc_pgd20",
)


def _summary(runs: list[tuple[str, Read]]) -> list[str]:
    """One row per (label, _read(...)): what it ran and its latest headline metrics."""
    rows = []
    for label, (config, result, latest, stopped) in runs:
        metrics, epochs = _headline(result, latest, stopped)
        algo = (config.get("algorithm") or {}).get("name", "training")
        strategy = (config.get("weight_at") or config.get("strategy") or {}).get("strategy", "standard")
        rows.append([label, algo, strategy, epochs])
        rows[-1] += [f"{100 * metrics[k]:.2f}" if k in metrics else "" for k in SUMMARY]
    keep = [i for i in range(4, 4 + len(SUMMARY)) if any(r[i] for r in rows)]
    head = ["run", "algorithm", "AT", "epochs", *[SUMMARY[i - 4] for i in keep]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r[:4] + [r[i] for i in keep]) + " |" for r in rows]
    return [*lines, ""]


def build_report(uri: str, folder: str, runs: list[tuple[str, Store]] | None = None) -> str:
    """Write report.md and its images into the local `folder`; returns the page's path.
    `runs`: the (label, store) pairs of `uri` when the caller has them already."""
    runs = _stores(uri) if runs is None else runs
    read = [(label, store, _read(store)) for label, store in runs]
    lines = [f"# distsearch report: {uri}", "", f"{len(runs)} run(s). Accuracies are in % throughout.", ""]
    lines += _summary([(label, r) for label, _, r in read])
    for label, store, r in read:
        lines += _section(label, store, r, folder)
    path = os.path.join(folder, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run_status(uri: str) -> int:
    """`distsearch status URI` on one run (a search's or training's --out, or a trial's store): what
    it runs, how far it is, its latest headline metrics, and whether a process is running it now,
    it finished, ASHA stopped it, or it was interrupted (with the command that continues it)."""
    from .config_file import run_command
    from .distributed.trainable import experiment_of  # layout only: no ray imported
    from .driver_lease import describe, live_drivers

    store = Store(uri, field="URI")
    config, result, latest, stopped = _read(store)
    algo = (config.get("algorithm") or {}).get("name")
    what = f"search ({algo})" if algo else f"training ({(config.get('strategy') or {}).get('strategy', 'standard')})"
    done = result.get("epochs") if result else (latest[2].get("epoch", 0) if latest else 0)
    where, made_on = _data(store, config)
    print(f"{uri}: {what} on {where}, epoch {done} of {config.get('epochs')}")
    if made_on:
        print(f"  data: {made_on}")
    metrics = _headline(result, latest, stopped)[0]
    shown = [f"{k} {_value(k, metrics[k])}" for k in SUMMARY if isinstance(metrics.get(k), (int, float))]
    if shown:
        print("  " + ", ".join(shown) + " (accuracies in %)")
    experiment = experiment_of(store)  # a trial's store: its experiment's driver runs it
    live = live_drivers(store) or (live_drivers(experiment) if experiment else [])
    if live:
        print(f"running: {describe(live[0])}")
    elif result:
        print(f"finished: {store.uri}/result.json")
    elif stopped:
        print(f"stopped early by {stopped['scheduler'].upper()} after epoch {stopped['epoch']}")
    elif experiment:
        print(f"not running: continue the experiment with `distsearch resume {experiment.uri}`")
    else:
        allow = " --allow-changes" if _changed_since(config, latest) else ""
        print(f"interrupted: continue it with `distsearch {run_command(config)} --out {uri} --resume{allow}`")
    return 0


def _changed_since(config: dict[str, Any], latest: Latest) -> bool:
    """Whether config.json changes what the newest valid checkpoint recorded it ran with (a resume
    with --allow-changes stopped before its first checkpoint): a plain --resume is then refused."""
    from .config import SearchConfig, TrainConfig
    from .config_file import resume_changes, run_command
    from .runner import recorded_config

    recorded = recorded_config(latest)
    if not recorded or recorded == config:
        return False
    try:
        return bool(
            resume_changes(recorded, (TrainConfig if run_command(config) == "train" else SearchConfig)(**config))
        )
    except ValueError:  # a config.json this version cannot read: --resume says so
        return False


def cmd_report(args: argparse.Namespace) -> int:
    from .cli_robust import _outputs, check_out

    runs = _stores(args.uri)  # a bad URI fails here, before anything is written
    check_out(args, "report")
    where = _outputs(args, "report", lambda folder: build_report(args.uri, folder, runs))
    print(f"report of {len(runs)} run(s): {where}/report.md")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a Markdown report with plots of a run or an experiment at URI")
    p.add_argument("uri", help="a search / training store, or an experiment root (<storage>/<name>)")
    p.add_argument(
        "--out", type=out_folder, help="folder or storage URI for report.md and its images (default: <URI>/report)"
    )
    p.set_defaults(func=cmd_report)
