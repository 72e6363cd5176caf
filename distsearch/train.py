"""Retraining: a discrete network (from a genotype) or a named model trained with any
adversarial-training strategy of robust/training.py, through the same cycle as a search:
seeded BatchStream, per-epoch clean and PGD robust accuracy, checksummed checkpoints,
exact resume, TensorBoard. `load_model(uri)` rebuilds the trained network (or a search's
supernet) from a store for evaluate / attack / certify.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import torch

from search_spaces import Genotype, Network

from .config import SearchConfig, TrainConfig
from .data import BatchStream, DataSplits, describe, shape_of
from .errors import UsageError, checkpoint_mismatch
from .loop import EpochLoop
from .runner import (
    build_data,
    build_supernet,
    evaluate,
    recorded_config,
    recorded_run,
    resume_and_record,
    robust_accuracy,
    same_shapes,
    setup_torch,
    without_history,
)
from .search.base import adopt_hyperparameters, hyperparameters, rng_state, set_rng_state
from .storage import Latest, Store

log = logging.getLogger(__name__)


def read_genotype(ref: str) -> Genotype:
    """A genotype from a JSON file/URI, or from a search store (its genotype.json or newest checkpoint)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(ref)
        if fs.isfile(path):
            return Genotype.from_json(fs.cat_file(path).decode())
        store = Store(ref, field="model.genotype")
        if store.exists("genotype.json"):
            return Genotype.from_dict(store.read_json("genotype.json"))
        latest = store.load_latest()
        if latest is not None:
            return Genotype.from_dict(latest[2]["genotype"])
    except UsageError:
        raise
    except ValueError as e:  # a bad genotype, a file that is not text, a scheme fsspec does not know
        raise UsageError(f"model.genotype: {ref}: {e}") from None
    raise UsageError(f"model.genotype: {ref!r} is neither a genotype JSON file nor a search's storage folder")


INHERITED_DATA = ("name", "root", "path", "download", "test_fraction", "synthetic")  # which data set, not how fed


def search_data(ref: str) -> dict[str, Any] | None:
    """What the run that `ref` (--genotype) comes from ran on: {"data": its data set (INHERITED_DATA
    of its config.json, or of the folder of its genotype.json), "seed": its seed (the held-out test
    split of mnist5k, digits, synthetic and x/y .npz files depends on it), "kind": search or train
    (a training run of a genotype, trained again)}; None when `ref` is no run's."""
    import fsspec

    from .config_file import run_command

    try:
        fs, path = fsspec.core.url_to_fs(ref)
        if fs.isfile(path):
            if posixpath.basename(ref.rstrip("/")) != "genotype.json":
                return None
            ref = posixpath.dirname(ref.rstrip("/"))
        store = Store(ref, field="model.genotype")
        has_config = store.exists("config.json")
    except (OSError, ValueError, UsageError):  # no store there: reading the genotype says so
        return None
    if has_config:  # a damaged one is one line naming it, not a silent run on the default data
        raw = store.read_config()
    else:  # deleted by hand: the newest valid checkpoint's record
        latest = store.load_latest() if store.list_checkpoints() else None
        raw = recorded_config(latest)
    if not raw:
        return None
    data = {k: v for k, v in raw.get("data", {}).items() if k in INHERITED_DATA}
    return {"data": {"name": "mnist5k", **data}, "seed": raw.get("seed", 0), "kind": run_command(raw)}


def run_genotype(cfg: TrainConfig, store: Store, latest: Latest = None) -> Genotype | None:
    """The genotype the run trains. A resume builds the genotype its newest valid checkpoint trained
    (its record; genotype.json for a checkpoint older than the record): model.genotype is not read
    again (a search it names may have moved on since, a relative path may name another file from
    another cwd). Only a model.genotype changed on purpose (--allow-changes) is read anew.
    `latest`: Store.load_latest's, read here when not given."""
    ref = cfg.model.genotype
    if not ref:
        return None
    latest = latest or store.load_latest()
    ran = recorded_run(store, latest[2]) if latest else {}
    if ran.get("genotype") and (ran["config"] or {}).get("model", {}).get("genotype") == ref:
        return Genotype.from_dict(ran["genotype"])
    return read_genotype(ref)


def build_network(cfg: TrainConfig, data: DataSplits, genotype: Genotype | None) -> torch.nn.Module:
    m = cfg.model
    if genotype is not None:
        return Network(
            genotype,
            data.in_channels,
            data.num_classes,
            C=m.C,
            layers=m.layers,
            auxiliary=m.auxiliary_weight > 0,
            drop_path_prob=m.drop_path_prob,
        )
    return named_model(m.name, data, m.kwargs, field="model")


def named_model(name: str, data: DataSplits, kwargs: dict[str, Any], field: str) -> torch.nn.Module:
    """robust.models.build_model sized to the data set (the MLP needs the image size); an error
    names `field`.name or `field`.kwargs."""
    from .robust.models import MODELS, build_model

    try:
        sized = {"image_size": data.image_size} | kwargs  # a model.kwargs image_size wins
        return build_model(name, in_channels=data.in_channels, num_classes=data.num_classes, **sized)
    except ValueError as e:
        raise UsageError(
            f"{field}.{'kwargs' if name in MODELS else 'name'}: {str(e).removeprefix('model: ')}"
        ) from None


def run_training(
    cfg: TrainConfig, store: Store, stop_after_steps: int | None = None, allow_changes: bool = False
) -> dict[str, Any]:
    """Train (or resume) to cfg.epochs; returns the last epoch's record."""
    device = setup_torch(cfg)
    data = build_data(cfg)
    latest = store.load_latest(map_location=device)  # read once: the genotype and the resume
    genotype = run_genotype(cfg, store, latest)
    model = build_network(cfg, data, genotype).to(device)
    strategy = cfg.strategy.build()
    o = cfg.optim
    strategy.grad_clip, strategy.aux_weight = o.grad_clip, cfg.model.auxiliary_weight
    optimizer = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, eta_min=o.lr_min)
    everything = torch.arange(len(data.x_train))
    stream = BatchStream(
        data.x_train, data.y_train, everything, cfg.data.batch_size, cfg.seed, device, cfg.data.augment, cfg.data.cutout
    )
    loop = EpochLoop(cfg, store, stream.batches_per_pass, f"train ({cfg.strategy.strategy})")
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "strategy": strategy, "stream": stream}

    def load(state: dict[str, Any]) -> None:
        configured = hyperparameters({"optimizer": optimizer}, {"scheduler": scheduler})
        for key, part in parts.items():
            part.load_state_dict(state[key])
        set_rng_state(state["rng"], device)
        # the configured schedule, not the loaded one (more epochs: T_max grows, the lr anneals to lr_min)
        adopt_hyperparameters({"optimizer": optimizer}, {"scheduler": scheduler}, configured)

    resume_and_record(loop, latest, load, data, allow_changes, genotype=genotype)
    if genotype is not None:  # the genotype trained (a resume's own, unless changed with --allow-changes)
        store.write_json("genotype.json", genotype.to_dict())
    if loop.epoch >= cfg.epochs and store.exists("result.json"):  # finished before: nothing to add or log
        return loop.final
    monitor = loop.open_monitor()

    def before_epoch(epoch: int) -> None:
        model.train()
        if isinstance(model, Network):
            model.drop_path_prob = cfg.model.drop_path_prob * epoch / cfg.epochs

    def end_epoch(epoch: int) -> dict[str, float]:
        scheduler.step()
        t = evaluate(model, data.x_test, data.y_test, cfg.data.eval_batch_size, device)
        record = {"test/loss": t["loss"], "test/acc": t["acc"], "lr": optimizer.param_groups[0]["lr"]}
        if cfg.eval.n:
            clean, robust = robust_accuracy(model, data.x_test, data.y_test, cfg.eval, cfg.data.eval_batch_size)
            record.update({"test/robust_clean_acc": clean, f"test/robust_acc_pgd{cfg.eval.steps}": robust})
        return record

    def state() -> tuple[dict[str, Any], dict[str, Any]]:
        return {k: part.state_dict() for k, part in parts.items()} | {"rng": rng_state(device)}, {"kind": "train"}

    loop.run(
        lambda: strategy.step(model, *next(stream), optimizer),
        end_epoch,
        state,
        before_epoch,
        stop_after_steps=stop_after_steps,
    )
    final = loop.final
    store.write_json("result.json", {"metrics": final, "epochs": loop.epoch, "steps": loop.step})
    monitor.hparams(
        {"strategy": cfg.strategy.strategy, "eps": cfg.strategy.eps or 0.0, "epochs": cfg.epochs},
        {k: v for k, v in final.items() if k.startswith("test/")},
    )
    monitor.close()
    return final


def relocate_data(cfg: Any, where: str) -> Any:
    """`cfg` with its data set read from `where`: the torchvision folder (data.root) or the .npz
    file (data.path) on this machine, for a run whose files lie elsewhere here (`--data`)."""
    from .data import TORCHVISION_SETS

    name = cfg.data.name
    if name not in (*TORCHVISION_SETS, "npz"):
        made = "is generated" if name == "synthetic" else "ships with its package"
        raise UsageError(f"--data: the run's data set {name} {made}, so it has no location; leave --data out")
    key = "path" if name == "npz" else "root"
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={key: where})})


def load_model(
    uri: str,
    device: str | torch.device = "cpu",
    setup: bool = False,
    threads: int | None = None,
    data_at: str | None = None,
) -> tuple[torch.nn.Module, DataSplits, dict[str, Any]]:
    """The trained network of a training store, or the supernet of a search store, with its
    data set; weights from the newest valid checkpoint, in eval mode. `setup`: torch set up
    first as the run's search/training set it up (setup_torch: its `threads`, or `threads`
    when given; deterministic; its seed), as evaluate / attack / certify do. `data_at`: where
    the data set is here (relocate_data), else where the run recorded it. A data set of other
    image shapes or classes than the run's data.json is refused; other images of the same
    shapes are allowed and named in the returned dict's `other_data`."""
    from .config_file import parse_config, run_command

    store = Store(uri, field="URI")
    latest = store.load_latest(map_location=device)
    if latest is None or not (ran := recorded_run(store, latest[2]))["config"]:
        if not store.exists("config.json"):
            raise UsageError(f"URI: {uri!r} holds no run (no config.json); point it at a search or training --out")
        raise UsageError(f"URI: no valid checkpoint under {uri!r}")
    name, state, meta = latest
    raw = ran["config"]  # what these weights were made with
    cfg = parse_config(raw, TrainConfig if run_command(raw) == "train" else SearchConfig)
    if data_at is not None:
        cfg = relocate_data(cfg, data_at)
    if setup:  # device: the one asked for here, not the run's
        setup_torch(cfg.model_copy(update={"device": "cpu"} | ({"threads": threads} if threads else {})))
    data = build_data(cfg)
    ran_on = ran["data"] and without_history(ran["data"])  # runs before data.json: nothing to compare
    fingerprint = data.fingerprint() if ran_on is not None else None
    if ran_on is not None and not same_shapes(ran_on, fingerprint):
        takes = f"the run's networks take {shape_of(ran_on)} (made on {describe(ran_on)})"
        raise UsageError(
            f"--data: holds {shape_of(fingerprint)}; {takes}"
            if data_at is not None
            else f"URI: its data set here holds {shape_of(fingerprint)}; {takes}; name the run's data with --data"
        )
    if isinstance(cfg, TrainConfig):
        genotype = Genotype.from_dict(ran["genotype"]) if ran.get("genotype") else None
        model, weights = build_network(cfg, data, genotype), state["model"]
    else:
        model, weights = build_supernet(cfg, data), state["searcher"]["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        fix = "its data set here may have other classes or image sizes (--data), or read it with the "
        fix += "distsearch version that wrote it"
        raise checkpoint_mismatch("URI", name, e, fix) from e
    other = ran_on is not None and ran_on != fingerprint  # other images of the same shape and classes
    info = {"config": raw, "meta": meta, "other_data": describe(fingerprint) if other else None}
    return model.to(device).eval(), data, info
