"""The one epoch loop of a search: bilevel batches, Searcher steps, per-epoch evaluation,
checkpoints (epoch ends and every N steps), exact resume from the newest valid
checkpoint, TensorBoard, and the `on_epoch` hook Ray Tune reports through.

A search is a pure function of (config, state): the checkpoint holds the searcher's
state_dict (weights, alphas, optimisers, scheduler, RNG), the positions of both batch
streams and the running epoch sums, so a resumed search continues bitwise exactly
(CPU, deterministic settings).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from search_spaces import Genotype, Supernet

from .config import RobustEvalConfig, RunConfig, SearchConfig
from .data import BatchStream, DataSplits, bilevel_split, eval_batches, load_dataset
from .errors import UsageError
from .monitor import Monitor
from .search import SEARCHERS, Searcher
from .storage import Store

log = logging.getLogger(__name__)
EpochHook = Callable[[int, dict[str, float], str], None]
# Config sections that must match for a store's checkpoints to be resumed.
STRUCTURAL = ("seed", "data", "space", "algorithm", "optim", "weight_at")


class Interrupted(RuntimeError):
    """Raised by `stop_after_steps` (tests and benchmarks simulate a crash with it)."""


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


def build_data(cfg: RunConfig) -> DataSplits:
    d = cfg.data
    return load_dataset(
        d.name,
        root=d.root,
        download=d.download,
        seed=cfg.seed,
        test_fraction=d.test_fraction,
        subset=d.subset,
        synthetic_kwargs=d.synthetic.model_dump(),
    )


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
        kwargs.update(in_channels=data.in_channels, num_classes=data.num_classes)
    return SEARCHERS[name](model, **kwargs)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for xb, yb in eval_batches(x, y, batch_size, device):
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return {"loss": float(loss) / len(x), "acc": float(correct) / len(x)}


def robust_accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RobustEvalConfig, batch_size: int
) -> float:
    """Accuracy under PGD-`steps` at `eps` on the first `n` examples (a fraction, eval mode)."""
    from .robust.attacks import PGD
    from .robust.evaluate import accuracy

    attack = PGD(eps=cfg.eps, steps=cfg.steps, norm=cfg.norm)
    return accuracy(model, x[: cfg.n], y[: cfg.n], attack, batch_size) / 100.0


def check_store_matches(store: Store, cfg: RunConfig, keys: tuple[str, ...] = STRUCTURAL) -> None:
    if not store.exists("config.json"):
        return
    old, new = store.read_json("config.json"), cfg.model_dump(mode="json")
    for key in keys:
        if old.get(key) != new.get(key):
            raise UsageError(
                f"storage.uri: {store.uri} holds a run with a different '{key}' section; "
                "resume with the same config or choose another --out"
            )


def run_search(
    cfg: SearchConfig,
    store: Store,
    monitor: Monitor | None = None,
    on_epoch: EpochHook | None = None,
    stop_after_steps: int | None = None,
) -> SearchResult:
    """Run (or resume) one search to `cfg.epochs`; returns the derived genotype and metrics."""
    device = setup_torch(cfg)
    data = build_data(cfg)
    model = build_supernet(cfg, data).to(device)
    searcher = build_searcher(cfg, model, data)
    tr_idx, val_idx = bilevel_split(len(data.x_train), cfg.data.train_portion)
    B = cfg.data.batch_size
    train = BatchStream(data.x_train, data.y_train, tr_idx, B, cfg.seed, device, cfg.data.augment)
    val = BatchStream(data.x_train, data.y_train, val_idx, B, cfg.seed + 1, device, cfg.data.augment)
    steps_per_epoch = train.batches_per_pass
    epoch, step, history, sums = 0, 0, [], {}

    check_store_matches(store, cfg)
    latest = store.load_latest(map_location=device)
    if latest is not None:
        name, state, meta = latest
        searcher.load_state_dict(state["searcher"])
        train.load_state_dict(state["train_stream"])
        val.load_state_dict(state["val_stream"])
        sums = state["sums"]
        epoch, step, history = meta["epoch"], meta["global_step"], meta["history"]
        log.info("resumed from %s (epoch %d, step %d)", name, epoch, step)
    else:
        store.write_json("config.json", cfg.model_dump(mode="json"))
    own_monitor = monitor is None
    if monitor is None:
        monitor = Monitor(store, cfg.monitor.tensorboard, purge_step=step or None)

    def checkpoint(epoch_done: int) -> str:
        state = {
            "searcher": searcher.state_dict(),
            "train_stream": train.state_dict(),
            "val_stream": val.state_dict(),
            "sums": sums,
        }
        meta = {
            "epoch": epoch_done,
            "global_step": step,
            "history": history,
            "genotype": searcher.genotype().to_dict(),
            "steps_per_epoch": steps_per_epoch,
            "epochs": cfg.epochs,
        }
        name = store.save_checkpoint(step, state, meta, keep=cfg.storage.keep)
        monitor.sync()
        return name

    bar = tqdm(
        total=cfg.epochs * steps_per_epoch,
        initial=step,
        disable=not cfg.monitor.progress,
        desc=f"{cfg.algorithm.name} search",
        unit="step",
        dynamic_ncols=True,
    )
    try:
        while epoch < cfg.epochs:
            model.train()
            t0 = time.time()
            while step - epoch * steps_per_epoch < steps_per_epoch:
                metrics = searcher.step(next(train), next(val))
                step += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().double()
                bar.update(1)
                if step % cfg.monitor.log_every == 0:
                    scalars = {f"step/{k}": float(v) for k, v in metrics.items()}
                    monitor.scalars(scalars, step)
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in list(scalars.items())[:4]})
                if cfg.storage.every_n_steps and step % cfg.storage.every_n_steps == 0:
                    checkpoint(epoch)
                if stop_after_steps is not None and step >= stop_after_steps:
                    raise Interrupted(f"stopped after {step} steps")
            searcher.end_epoch()
            epoch += 1
            record = {f"train/{k}": float(v) / steps_per_epoch for k, v in sums.items()}
            sums = {}
            val_eval = evaluate(model, data.x_train[val_idx], data.y_train[val_idx], cfg.data.eval_batch_size, device)
            test_eval = evaluate(model, data.x_test, data.y_test, cfg.data.eval_batch_size, device)
            record.update(
                {
                    "val/loss": val_eval["loss"],
                    "val/acc": val_eval["acc"],
                    "test/loss": test_eval["loss"],
                    "test/acc": test_eval["acc"],
                    "epoch": epoch,
                    "time/epoch_s": time.time() - t0,
                }
            )
            if cfg.eval.n:
                xv, yv = data.x_train[val_idx], data.y_train[val_idx]
                record["val/robust_acc"] = robust_accuracy(model, xv, yv, cfg.eval, cfg.data.eval_batch_size)
            record.update(searcher.learning_rates())
            history.append(record)
            monitor.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch)
            images = epoch % cfg.monitor.images_every == 0 or epoch == cfg.epochs
            monitor.architecture(model, epoch, images=images)
            if images and hasattr(searcher, "explanation_images"):
                xv, _ = next(iter(eval_batches(data.x_test, data.y_test, 16, device)))
                for tag, grid in searcher.explanation_images(xv).items():
                    monitor.image_grid(f"explain/{tag}", grid, epoch)
            name = checkpoint(epoch)
            if on_epoch is not None:
                on_epoch(epoch, record, name)
    finally:
        bar.close()
        if own_monitor and epoch < cfg.epochs:
            monitor.close()

    genotype = searcher.genotype()
    final = history[-1] if history else {}
    store.write_json("genotype.json", genotype.to_dict())
    store.write_json("result.json", {"genotype": genotype.to_dict(), "metrics": final, "epochs": epoch, "steps": step})
    if own_monitor:
        monitor.genotype(genotype, epoch)
        monitor.hparams(hparams_of(cfg), {k: v for k, v in final.items() if k.startswith(("val/", "test/"))})
        monitor.close()
    return SearchResult(genotype, final, epoch, step, history)


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
