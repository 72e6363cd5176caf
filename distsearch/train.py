"""Retraining: a discrete network (from a genotype) or a named model trained with any
adversarial-training strategy of robust/training.py, through the same cycle as a search:
seeded BatchStream, per-epoch clean and PGD robust accuracy, checksummed checkpoints,
exact resume, TensorBoard. `load_model(uri)` rebuilds the trained network (or a search's
supernet) from a store for evaluate / attack / certify.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from search_spaces import Genotype, GenotypeError, Network

from .config import SearchConfig, TrainConfig
from .data import BatchStream, DataSplits
from .errors import UsageError
from .monitor import Monitor
from .runner import build_data, build_supernet, evaluate, robust_accuracy, setup_torch
from .search.base import rng_state, set_rng_state
from .storage import Store

log = logging.getLogger(__name__)


def read_genotype(ref: str) -> Genotype:
    """A genotype from a JSON file/URI, or from a search store (its genotype.json or newest checkpoint)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(ref)
        if fs.isfile(path):
            return Genotype.from_json(fs.cat_file(path).decode())
        store = Store(ref)
        if store.exists("genotype.json"):
            return Genotype.from_dict(store.read_json("genotype.json"))
        latest = store.load_latest()
        if latest is not None:
            return Genotype.from_dict(latest[2]["genotype"])
    except GenotypeError as e:
        raise UsageError(f"model.genotype: {ref}: {e}") from None
    raise UsageError(f"model.genotype: {ref!r} is neither a genotype JSON file nor a search's storage folder")


def build_network(cfg: TrainConfig, data: DataSplits, genotype: Genotype | None) -> torch.nn.Module:
    m = cfg.model
    if genotype is not None:
        return Network(
            genotype, data.in_channels, data.num_classes, C=m.C, layers=m.layers, drop_path_prob=m.drop_path_prob
        )
    from .robust.models import build_model

    kwargs = ({"image_size": data.image_size} if m.name == "mlp" else {}) | m.kwargs
    try:
        return build_model(m.name, in_channels=data.in_channels, num_classes=data.num_classes, **kwargs)
    except ValueError as e:
        raise UsageError(f"model.name: {e}") from None


def run_training(cfg: TrainConfig, store: Store, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) to cfg.epochs; returns the last epoch's record."""
    from .runner import Interrupted, check_store_matches

    device = setup_torch(cfg)
    data = build_data(cfg)
    genotype = read_genotype(cfg.model.genotype) if cfg.model.genotype else None
    model = build_network(cfg, data, genotype).to(device)
    strategy = cfg.strategy.build()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg.optim.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, eta_min=cfg.optim.lr_min)
    stream = BatchStream(
        data.x_train,
        data.y_train,
        torch.arange(len(data.x_train)),
        cfg.data.batch_size,
        cfg.seed,
        device,
        cfg.data.augment,
    )
    steps_per_epoch = stream.batches_per_pass
    epoch, step, history, sums = 0, 0, [], {}

    check_store_matches(store, cfg, ("seed", "data", "model", "strategy", "optim"))
    latest = store.load_latest(map_location=device)
    if latest is not None:
        _, state, meta = latest
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        strategy.load_state_dict(state["strategy"])
        stream.load_state_dict(state["stream"])
        set_rng_state(state["rng"], device)
        sums, epoch, step, history = state["sums"], meta["epoch"], meta["global_step"], meta["history"]
    else:
        store.write_json("config.json", cfg.model_dump(mode="json"))
        if genotype is not None:
            store.write_json("genotype.json", genotype.to_dict())
    monitor = Monitor(store, cfg.monitor.tensorboard, purge_step=step or None)

    def checkpoint(epoch_done: int) -> str:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "strategy": strategy.state_dict(),
            "stream": stream.state_dict(),
            "rng": rng_state(device),
            "sums": sums,
        }
        meta = {"epoch": epoch_done, "global_step": step, "history": history, "kind": "train"}
        name = store.save_checkpoint(step, state, meta, keep=cfg.storage.keep)
        monitor.sync()
        return name

    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=step,
        disable=not cfg.monitor.progress,
        desc=f"train ({cfg.strategy.strategy})",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        while epoch < cfg.epochs:
            model.train()
            if isinstance(model, Network):
                model.drop_path_prob = cfg.model.drop_path_prob * epoch / cfg.epochs
            t0 = time.time()
            while step - epoch * steps_per_epoch < steps_per_epoch:
                metrics = strategy.step(model, *next(stream), optimizer)
                step += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().double()
                bar.update(1)
                if step % cfg.monitor.log_every == 0:
                    monitor.scalars({f"step/{k}": v for k, v in metrics.items()}, step)
                if cfg.storage.every_n_steps and step % cfg.storage.every_n_steps == 0:
                    checkpoint(epoch)
                if stop_after_steps is not None and step >= stop_after_steps:
                    raise Interrupted(f"stopped after {step} steps")
            scheduler.step()
            epoch += 1
            record = {f"train/{k}": float(v) / steps_per_epoch for k, v in sums.items()}
            sums = {}
            test = evaluate(model, data.x_test, data.y_test, cfg.data.eval_batch_size, device)
            record.update(
                {
                    "test/loss": test["loss"],
                    "test/acc": test["acc"],
                    "epoch": epoch,
                    "lr": optimizer.param_groups[0]["lr"],
                    "time/epoch_s": time.time() - t0,
                }
            )
            if cfg.eval.n:
                record[f"test/robust_acc_pgd{cfg.eval.steps}"] = robust_accuracy(
                    model, data.x_test, data.y_test, cfg.eval, cfg.data.eval_batch_size
                )
            history.append(record)
            monitor.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch)
            bar.set_postfix(acc=f"{record['test/acc']:.3f}")
            checkpoint(epoch)
    finally:
        bar.close()
        if epoch < cfg.epochs:
            monitor.close()
    final = history[-1] if history else {}
    store.write_json("result.json", {"metrics": final, "epochs": epoch, "steps": step})
    monitor.hparams(
        {"strategy": cfg.strategy.strategy, "eps": cfg.strategy.eps or 0.0, "epochs": cfg.epochs},
        {k: v for k, v in final.items() if k.startswith("test/")},
    )
    monitor.close()
    return final


def load_model(uri: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, DataSplits, dict[str, Any]]:
    """The trained network of a training store, or the supernet of a search store, with its
    data set; weights from the newest valid checkpoint, in eval mode."""
    from .config import parse_config

    store = Store(uri)
    if not store.exists("config.json"):
        raise UsageError(f"URI: {uri!r} holds no run (no config.json); point it at a search or training --out")
    raw = store.read_json("config.json")
    latest = store.load_latest(map_location=device)
    if latest is None:
        raise UsageError(f"URI: no valid checkpoint under {uri!r}")
    _, state, meta = latest
    if "model" in raw:
        cfg = parse_config(raw, TrainConfig)
        data = build_data(cfg)
        genotype = Genotype.from_dict(store.read_json("genotype.json")) if cfg.model.genotype else None
        model = build_network(cfg, data, genotype)
        model.load_state_dict(state["model"])
    else:
        cfg = parse_config(raw, SearchConfig)
        data = build_data(cfg)
        model = build_supernet(cfg, data)
        model.load_state_dict(state["searcher"]["model"])
    return model.to(device).eval(), data, {"config": raw, "meta": meta}
