"""Ctrl-C is never lost (distsearch/interrupt.py): a KeyboardInterrupt that Python drops because
it landed in a finaliser still stops the search, which exits 130 with its resume hint."""

from __future__ import annotations

import signal
import sys
import threading

import pytest
import torch
import yaml
from torch import nn

from distsearch.cli import main
from distsearch.interrupt import sigint_recorded
from distsearch.robust.certify import certified_accuracy
from distsearch.robust.evaluate import right_masks
from distsearch.search.darts import DartsSearcher
from distsearch.storage import Store
from tests.conftest import tiny_raw


class _CtrlCInFinaliser:
    """Deleted at once: SIGINT arrives inside __del__, where Python prints the KeyboardInterrupt
    as "Exception ignored" and drops it (as matplotlib's weakref callbacks did on CI)."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def test_a_ctrl_c_dropped_by_a_finaliser_still_stops_the_search(tmp_path, monkeypatch, capsys):
    steps = []
    real_step = DartsSearcher.step

    def step(self, *batches):
        out = real_step(self, *batches)
        steps.append(1)
        if len(steps) == 3:
            _CtrlCInFinaliser()
        return out

    monkeypatch.setattr(DartsSearcher, "step", step)
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    out = (tmp_path / "run").as_uri()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_raw("unused", epochs=3)))
    rc = main(["search", "--config", str(tmp_path / "cfg.yaml"), "--out", out])
    err = capsys.readouterr().err
    assert dropped == [KeyboardInterrupt], "the interrupt was not dropped: this test no longer tests the fallback"
    assert rc == 130 and f"distsearch search --out {out} --resume" in err, err
    assert len(steps) == 3 and Store(out).list_checkpoints() == []  # stopped in epoch 1 (4 steps), nothing saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_sigint_recorded_changes_nothing_off_the_main_thread_or_when_sigint_is_ignored():
    seen = []

    def worker() -> None:
        with sigint_recorded():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]
    kept = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. started in the background with nohup
    try:
        with sigint_recorded():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, kept)


class _BarThatDropsCtrlC:
    """A progress bar whose first update drops a Ctrl-C (it lands in a finaliser)."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k
        if self.n == 1:
            _CtrlCInFinaliser()


def test_attack_and_certify_batches_stop_at_a_dropped_ctrl_c(monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", lambda u: None)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(8, 1, 2, 2), torch.arange(8) % 3
    for run in (
        lambda bar: right_masks(model, x, y, batch_size=2, bar=bar),
        lambda bar: certified_accuracy(model, x, y, [0.1], batch_size=2, bar=bar),
    ):
        bar = _BarThatDropsCtrlC()
        with sigint_recorded(), pytest.raises(KeyboardInterrupt):
            run(bar)
        assert bar.n == 1  # the second batch never finished


def test_ctrl_c_while_the_console_script_loads_is_one_line_and_130(monkeypatch, capsys):
    """`distsearch` pressed Ctrl-C on while torch loads: no traceback (console.run)."""
    import importlib.abc

    from distsearch.console import run

    class CtrlCOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "distsearch.cli":
                raise KeyboardInterrupt

    monkeypatch.delitem(sys.modules, "distsearch.cli")
    monkeypatch.setattr(sys, "meta_path", [CtrlCOnImport(), *sys.meta_path])
    assert run() == 130
    assert capsys.readouterr().err == "interrupted while starting; nothing was written\n"
