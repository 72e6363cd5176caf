"""The one epoch loop behind `run_search` (runner.py) and `run_training` (train.py).

It owns what both need and nothing else: resume from the newest valid checkpoint (the
run's own state plus the loop's counters and running sums), steps with progress and
step-level scalars, checkpoints at epoch ends and every N steps, epoch records into
TensorBoard and the `on_epoch` hook. A run supplies its step, its epoch-end evaluation
and its state; so a resumed run continues bitwise exactly where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import RunConfig
from .errors import UsageError, checkpoint_mismatch
from .interrupt import raise_if_interrupted
from .monitor import Monitor
from .storage import Latest, Store

log = logging.getLogger(__name__)
EpochHook = Callable[[int, dict[str, float], str], None]


class Interrupted(RuntimeError):
    """Raised by `stop_after_steps` (tests and benchmarks simulate a crash with it)."""


@dataclass
class EpochLoop:
    cfg: RunConfig
    store: Store
    steps_per_epoch: int
    desc: str
    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    monitor: Monitor | None = None
    # what the run is made of (runner.resume_and_record: its config, data fingerprint and a
    # training's genotype); every checkpoint carries it, so a resume is checked against the
    # checkpoint, not against files one may edit
    recorded: dict[str, Any] = field(default_factory=dict)

    def resume(
        self,
        latest: Latest,
        load: Callable[[dict[str, Any]], None],
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> bool:
        """Load the newest valid checkpoint (`latest`: Store.load_latest's) into the run (`load`)
        and the loop; False if none. `check(meta)` may refuse it first (raising), before anything
        is loaded."""
        if latest is None:
            if committed := self.store.list_checkpoints():
                log.warning(
                    "none of the %d checkpoints in %s verifies: starting from step 0", len(committed), self.store.uri
                )
            return False
        name, state, meta = latest
        if check is not None:
            check(meta)
        self.check_epochs(meta["epoch"], meta["global_step"])
        try:
            load(state)
        except (RuntimeError, KeyError) as e:  # a layout mismatch: nothing is written
            fix = "resume it with the distsearch version that wrote it, or write to a new --out"
            raise checkpoint_mismatch("--resume", name, e, fix) from e
        self.sums, self.epoch, self.step, self.history = (
            state["sums"],
            meta["epoch"],
            meta["global_step"],
            meta["history"],
        )
        log.info("resumed from %s (epoch %d, step %d)", name, self.epoch, self.step)
        return True

    def check_epochs(self, done: int, step: int) -> None:
        """Refuse to resume with fewer epochs than the run has begun (it would stop there, its
        config.json saying fewer epochs than it holds); before anything is loaded or written."""
        begun = done + (step > done * self.steps_per_epoch)  # a mid-epoch checkpoint: that epoch too
        if begun > self.cfg.epochs:
            what = f"{done} epoch{'s' * (done != 1)}" + (f" and part of epoch {begun}" if begun > done else "")
            raise UsageError(f"epochs: the run at {self.store.uri} has done {what}; resume with epochs >= {begun}")

    def open_monitor(self, monitor: Monitor | None = None) -> Monitor:
        """The given monitor, or one of our own whose event files drop what followed the checkpoint."""
        self.own_monitor = monitor is None
        self.monitor = monitor or Monitor(self.store, self.cfg.monitor.tensorboard, purge_step=self.step or None)
        return self.monitor

    def checkpoint(self, state: dict[str, Any], meta: dict[str, Any]) -> str:
        meta = {"epoch": self.epoch, "global_step": self.step, "history": self.history, "run": self.recorded, **meta}
        name = self.store.save_checkpoint(self.step, {**state, "sums": self.sums}, meta, keep=self.cfg.storage.keep)
        self.monitor.sync()
        return name

    def run(
        self,
        step_fn: Callable[[], dict[str, torch.Tensor]],
        end_epoch: Callable[[int], dict[str, float]],
        state_fn: Callable[[], tuple[dict[str, Any], dict[str, Any]]],
        before_epoch: Callable[[int], None] | None = None,
        on_epoch: EpochHook | None = None,
        stop_after_steps: int | None = None,
    ) -> None:
        """Run to cfg.epochs. `end_epoch(epoch)` (epoch now counts the finished one) returns the
        record's evaluation entries; `state_fn()` returns (state, extra meta) to checkpoint."""
        cfg, monitor, n = self.cfg, self.monitor, self.steps_per_epoch
        bar = tqdm(
            total=cfg.epochs * n,
            initial=self.step,
            disable=not cfg.monitor.progress,
            desc=self.desc,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            while self.epoch < cfg.epochs:
                if before_epoch is not None:
                    before_epoch(self.epoch)
                t0 = time.time()
                while self.step - self.epoch * n < n:
                    metrics = step_fn()
                    raise_if_interrupted()  # before the step counts: a swallowed Ctrl-C stops here
                    self.step += 1
                    for k, v in metrics.items():
                        self.sums[k] = self.sums.get(k, 0.0) + torch.as_tensor(v).detach().double()
                    bar.update(1)
                    if self.step % cfg.monitor.log_every == 0:  # the only host sync: once per interval
                        scalars = {f"step/{k}": float(v) for k, v in metrics.items()}
                        monitor.scalars(scalars, self.step)
                        bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in list(scalars.items())[:4]})
                    last = self.step - self.epoch * n == n  # the epoch-end checkpoint follows under this name
                    if cfg.storage.every_n_steps and self.step % cfg.storage.every_n_steps == 0 and not last:
                        self.checkpoint(*state_fn())
                    if stop_after_steps is not None and self.step >= stop_after_steps:
                        raise Interrupted(f"stopped after {self.step} steps")
                self.epoch += 1
                record = {f"train/{k}": float(v) / n for k, v in self.sums.items()}
                self.sums = {}
                record.update(end_epoch(self.epoch))
                record.update({"epoch": self.epoch, "time/epoch_s": time.time() - t0})
                self.history.append(record)
                monitor.scalars({k: v for k, v in record.items() if k != "epoch"}, self.epoch)
                name = self.checkpoint(*state_fn())
                if on_epoch is not None:
                    on_epoch(self.epoch, record, name)
            raise_if_interrupted()  # one dropped during the last epoch's end: no results, as if caught
        finally:
            bar.close()
            if self.own_monitor and self.epoch < cfg.epochs:
                monitor.close()

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}
