"""A search: bilevel batches, Searcher steps and per-epoch evaluation, run by the shared
epoch loop (loop.py: checkpoints at epoch ends and every N steps, exact resume from the
newest valid checkpoint, TensorBoard, the `on_epoch` hook Ray Tune reports through).
Also the builders (data, supernet, searcher) that train.py and distributed/ reuse.

A search is a pure function of (config, state): the checkpoint holds the searcher's
state_dict (weights, alphas, optimisers, scheduler, RNG), the positions of both batch
streams and the running epoch sums, so a resumed search continues bitwise exactly
(CPU, deterministic settings).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from search_spaces import Genotype, Supernet

from .config import RobustEvalConfig, RunConfig, SearchConfig
from .config_file import resume_changes, run_command
from .data import BatchStream, DataSplits, bilevel_split, describe, eval_batches, load_dataset, located
from .errors import UsageError
from .loop import EpochHook, EpochLoop, Interrupted  # noqa: F401 - Interrupted re-exported
from .monitor import Monitor
from .search import SEARCHERS, Searcher
from .search.graphed import GraphedStep
from .storage import Latest, Store

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    genotype: Genotype
    metrics: dict[str, float]
    epochs: int
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device: 'cuda' asked for but no GPU is visible; use device=auto or cpu")
    return torch.device(name)


def setup_torch(cfg: RunConfig) -> torch.device:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(cfg.seed)
    return resolve_device(cfg.device)


def memory_format(cfg: SearchConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def autocast(cfg: SearchConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for a search step (no weight cache under a CUDA graph: it would outlive the capture)."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, torch.bfloat16, cache_enabled=not cfg.cuda_graph)


def build_data(cfg: RunConfig) -> DataSplits:
    d = cfg.data
    data = load_dataset(
        d.name,
        root=d.root,
        download=d.download,
        seed=cfg.seed,
        test_fraction=d.test_fraction,
        subset=d.subset,
        synthetic_kwargs=d.synthetic.model_dump(),
        path=d.path,
    )
    if log.isEnabledFor(logging.INFO):  # -v
        log.info("data: %s, %s", d.name, describe(data.fingerprint()))
    return data


def build_supernet(cfg: SearchConfig, data: DataSplits) -> Supernet:
    s = cfg.space
    try:
        return Supernet(
            data.in_channels,
            data.num_classes,
            C=s.C,
            layers=s.layers,
            nodes=s.nodes,
            stem_multiplier=s.stem_multiplier,
            ops=tuple(s.ops),
            image_size=data.image_size,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_weight_strategy(cfg: SearchConfig) -> Any:
    if cfg.weight_at is None or cfg.weight_at.strategy == "standard":
        return None
    return cfg.weight_at.build()


def build_searcher(cfg: SearchConfig, model: Supernet, data: DataSplits) -> Searcher:
    algo = cfg.algorithm.model_dump()
    name = algo.pop("name")
    kwargs = dict(epochs=cfg.epochs, **cfg.optim.model_dump(), **algo, weight_strategy=build_weight_strategy(cfg))
    if name == "lease":
        kwargs.update(in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size)
    return SEARCHERS[name](model, **kwargs)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, float]:
    from .robust.attack_base import eval_mode

    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    with eval_mode(model):
        for xb, yb in eval_batches(x, y, batch_size, device):
            logits = model(xb)
            loss += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    return {"loss": float(loss) / len(x), "acc": float(correct) / len(x)}


def robust_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RobustEvalConfig, batch_size: int
) -> tuple[float, float]:
    """(clean, robust) accuracy of the first `n` examples under PGD-`steps` at `eps`, as
    fractions, in eval mode; robust counts an example right on x and under attack."""
    from .robust.attacks import PGD
    from .robust.evaluate import accuracies

    attack = PGD(eps=cfg.eps, steps=cfg.steps, norm=cfg.norm)
    clean, robust = accuracies(model, x[: cfg.n], y[: cfg.n], attack, batch_size)
    return clean / 100.0, robust / 100.0


def check_kind(store: Store, cfg: RunConfig) -> None:
    """A store holding a run must hold this config's kind of run (search or training)."""
    if not store.exists("config.json"):
        return
    command = run_command(store.read_config())
    if command != run_command(cfg.model_dump()):
        kind = "a training run" if command == "train" else "a search"
        raise UsageError(f"{store.field}: {store.uri} holds {kind}, not this kind of run; choose another --out")


DATA_FILE = "data.json"  # the run's data set (DataSplits.fingerprint), written at every (re)start
DATA_KEYS = {"train": list, "test": list, "classes": int, "sha256": str}  # what data.json must hold


def without_history(found: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in found.items() if k != "earlier"}


def same_shapes(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two fingerprints' images have one shape and their labels one number of classes: the
    networks of a run made on one take the other."""
    return (a["train"][1:], a["classes"]) == (b["train"][1:], b["classes"])


def recorded_config(latest: Latest) -> dict[str, Any] | None:
    """The config a checkpoint (Store.load_latest's) records; None without one, or before the record."""
    return (latest[2].get("run") or {}).get("config") if latest else None


def recorded_run(store: Store, meta: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint with `meta` ran with: its record (config, data, a training's genotype);
    for a checkpoint older than the record, config.json (None when gone), data.json and, for a
    training of a genotype, genotype.json."""
    if meta.get("run"):
        return meta["run"]
    config = store.read_config() if store.exists("config.json") else None
    ran = {"config": config, "data": store.read_json(DATA_FILE, None, DATA_KEYS)}
    if (config or {}).get("model", {}).get("genotype") and store.exists("genotype.json"):
        ran["genotype"] = store.read_json("genotype.json")
    return ran


def check_resume(
    store: Store,
    cfg: RunConfig,
    fingerprint: dict[str, Any],
    meta: dict[str, Any],
    allow_changes: bool = False,
    config_may_change: bool = False,
    genotype: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A resume continues the run its newest valid checkpoint holds, as that checkpoint records it
    (recorded_run). Unless `allow_changes`: the same values but for what a resume may change
    (config_file.resume_changes; any with `config_may_change`: a PBT exploit's), the same genotype,
    and the same images (the same file moved is fine). With it: other values, and other images of
    the same shapes and classes (logged, the earlier fingerprint kept under `earlier`); other
    shapes or classes never (its networks could not take them). Returns the data record."""
    ran = recorded_run(store, meta)
    config = ran["config"] or cfg.model_dump(mode="json")  # neither a record nor config.json: no check
    changes = [] if allow_changes or config_may_change else resume_changes(config, cfg)
    if changes:
        command = run_command(config)
        edited = store.exists("config.json") and not resume_changes(store.read_config(), cfg)
        fix = (
            "its config.json says otherwise (edited, or an --allow-changes resume stopped before its first "
            "checkpoint): pass --config with the values it ran with, or --allow-changes"
            if edited
            else f"continue it as it ran: `distsearch {command} --out {store.uri} --resume` (without the --config "
            "or --set that change them), or pass --allow-changes"
        )
        raise UsageError(f"{store.field}: {store.uri} ran with other values ({'; '.join(changes)}); {fix}")
    if not allow_changes and "genotype" in ran and ran["genotype"] != genotype:
        raise UsageError(
            f"model.genotype: {store.uri} trained another genotype than the one its genotype.json or "
            "model.genotype now gives (edited since); restore genotype.json, or pass --allow-changes"
        )
    found = ran["data"]
    if found is None:
        return fingerprint
    earlier, recorded = found.get("earlier", []), without_history(found)
    if recorded == without_history(fingerprint):
        return {**fingerprint, "earlier": earlier} if earlier else fingerprint
    d = config.get("data") or {}
    where = located(d.get("name", "mnist5k"), d.get("root"), d.get("path"))
    what = f"{store.uri} ran on {describe(recorded)} ({where}); this config gives {describe(fingerprint)}"
    if not same_shapes(recorded, fingerprint):
        raise UsageError(
            f"data: {what}: its networks cannot take other image shapes or classes; point data.path / "
            "data.root at the run's data set"
        )
    if not allow_changes:
        raise UsageError(f"data: {what}. Point data.path / data.root at the run's data set, or pass --allow-changes")
    log.warning("data: %s; continuing on the new images (--allow-changes)", what)
    return {**fingerprint, "earlier": [*earlier, recorded]}


def record_run(store: Store, record: dict[str, Any], epoch: int, outputs: tuple[str, ...] = ()) -> None:
    """config.json and data.json, at every (re)start (epochs, monitor, the data's location may change).
    A run that goes on (at `epoch` of more cfg.epochs) drops result.json and `outputs` a finished run
    wrote: they would say it is finished and hand out its old results (status, report, train --genotype)."""
    store.write_json("config.json", record["config"])
    store.write_json(DATA_FILE, record["data"])
    if epoch < record["config"]["epochs"]:
        for name in ("result.json", *outputs):
            if store.exists(name):
                store.fs.rm(store.path(name))


def resume_and_record(
    loop: EpochLoop,
    latest: Latest,
    load: Callable[[dict[str, Any]], None],
    data: DataSplits,
    allow_changes: bool,
    config_may_change: bool = False,
    outputs: tuple[str, ...] = (),
    genotype: Genotype | None = None,
) -> None:
    """Check the run (check_kind), loop.resume from `latest` (Store.load_latest's), checked first
    (check_resume), then record_run. Each checkpoint from here on carries the record (config, data, genotype)."""
    check_kind(loop.store, loop.cfg)
    record = {"config": loop.cfg.model_dump(mode="json"), "data": data.fingerprint()}
    if genotype is not None:
        record["genotype"] = genotype.to_dict()

    def check(meta: dict[str, Any]) -> None:
        record["data"] = check_resume(
            loop.store, loop.cfg, record["data"], meta, allow_changes, config_may_change, record.get("genotype")
        )

    loop.resume(latest, load, check)
    record_run(loop.store, record, loop.epoch, outputs)
    loop.recorded = record


def run_search(
    cfg: SearchConfig,
    store: Store,
    monitor: Monitor | None = None,
    on_epoch: EpochHook | None = None,
    stop_after_steps: int | None = None,
    allow_changes: bool = False,
    config_may_change: bool = False,
) -> SearchResult:
    """Run (or resume) one search to `cfg.epochs`; returns the derived genotype and metrics.
    A resume refuses a config that changes what the run ran with unless `allow_changes` (or
    `config_may_change`: a PBT exploit's config; its data is still checked)."""
    device = setup_torch(cfg)
    if cfg.cuda_graph and device.type != "cuda":
        raise UsageError(f"cuda_graph: needs a GPU; device resolved to {device.type}")
    data = build_data(cfg)
    model = build_supernet(cfg, data).to(device, memory_format=memory_format(cfg))
    searcher = build_searcher(cfg, model, data)
    tr_idx, val_idx = bilevel_split(len(data.x_train), cfg.data.train_portion)
    B = cfg.data.batch_size
    train = BatchStream(data.x_train, data.y_train, tr_idx, B, cfg.seed, device, cfg.data.augment, cfg.data.cutout)
    val = BatchStream(data.x_train, data.y_train, val_idx, B, cfg.seed + 1, device, cfg.data.augment)
    loop = EpochLoop(cfg, store, train.batches_per_pass, f"{cfg.algorithm.name} search")

    def load(state: dict[str, Any]) -> None:
        searcher.load_state_dict(state["searcher"])
        train.load_state_dict(state["train_stream"])
        val.load_state_dict(state["val_stream"])

    # the search's genotype.json is rewritten at its end
    latest = store.load_latest(map_location=device)
    resume_and_record(loop, latest, load, data, allow_changes, config_may_change, outputs=("genotype.json",))
    if loop.epoch >= cfg.epochs and store.exists("result.json"):  # finished before: nothing to add or log
        return SearchResult(searcher.genotype(), loop.final, loop.epoch, loop.step, loop.history)
    monitor = loop.open_monitor(monitor)

    def end_epoch(epoch: int) -> dict[str, float]:
        searcher.end_epoch()
        xv, yv = data.x_train[val_idx], data.y_train[val_idx]
        v = evaluate(model, xv, yv, cfg.data.eval_batch_size, device)
        t = evaluate(model, data.x_test, data.y_test, cfg.data.eval_batch_size, device)
        record = {"val/loss": v["loss"], "val/acc": v["acc"], "test/loss": t["loss"], "test/acc": t["acc"]}
        if cfg.eval.n:
            clean, robust = robust_accuracy(model, xv, yv, cfg.eval, cfg.data.eval_batch_size)
            record.update({"val/robust_clean_acc": clean, "val/robust_acc": robust})
        record.update(searcher.learning_rates())
        images = epoch % cfg.monitor.images_every == 0 or epoch == cfg.epochs
        monitor.architecture(model, epoch, images=images)
        if images and hasattr(searcher, "explanation_images"):
            x16, _ = next(iter(eval_batches(data.x_test, data.y_test, 16, device)))
            for tag, grid in searcher.explanation_images(x16).items():
                monitor.image_grid(f"explain/{tag}", grid, epoch)
        return record

    def state() -> tuple[dict[str, Any], dict[str, Any]]:
        run = {"searcher": searcher.state_dict(), "train_stream": train.state_dict(), "val_stream": val.state_dict()}
        return run, {"genotype": searcher.genotype().to_dict(), "steps_per_epoch": loop.steps_per_epoch}

    def before_epoch(epoch: int) -> None:
        model.train()

    searcher_step = GraphedStep(searcher) if cfg.cuda_graph else searcher.step
    fmt = memory_format(cfg)

    def step() -> dict[str, torch.Tensor]:
        batches = [(x.contiguous(memory_format=fmt), y) for x, y in (next(train), next(val))]
        with autocast(cfg, device):
            return searcher_step(*batches)

    loop.run(step, end_epoch, state, before_epoch, on_epoch, stop_after_steps)

    genotype, final = searcher.genotype(), loop.final
    store.write_json("genotype.json", genotype.to_dict())
    store.write_json(
        "result.json", {"genotype": genotype.to_dict(), "metrics": final, "epochs": loop.epoch, "steps": loop.step}
    )
    if loop.own_monitor:
        monitor.genotype(genotype, loop.epoch)
        monitor.hparams(hparams_of(cfg), {k: v for k, v in final.items() if k.startswith(("val/", "test/"))})
        monitor.close()
    return SearchResult(genotype, final, loop.epoch, loop.step, loop.history)


def hparams_of(cfg: SearchConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, d: Any) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif not isinstance(d, (list, tuple)) and d is not None:
            flat[prefix] = d

    walk("", cfg.model_dump(include={"seed", "epochs", "algorithm", "optim", "space", "data"}, mode="json"))
    return flat
