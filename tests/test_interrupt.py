"""Ctrl-C and SIGTERM are never lost (distsearch/interrupt.py): a KeyboardInterrupt that Python
drops because it landed in a finaliser still stops the search, which exits 130 (143 for SIGTERM)
with its resume hint; a SIGTERMed search releases its lease."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from distsearch.cli import main
from distsearch.driver_lease import leases
from distsearch.interrupt import signals_recorded
from distsearch.robust.certify import certified_accuracy
from distsearch.robust.evaluate import right_masks
from distsearch.search.darts import DartsSearcher
from distsearch.storage import Store
from tests.conftest import tiny_raw


@pytest.fixture(autouse=True)
def _python_signal_handling():
    """Python's own SIGINT and SIGTERM handling, whatever an earlier test (ray.init) installed."""
    kept = {
        s: signal.signal(s, h)
        for s, h in [(signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)]
    }
    yield
    for s, handler in kept.items():
        signal.signal(s, handler)


class _SignalInFinaliser:
    """Deleted at once: the signal arrives inside __del__, where Python prints the exception as
    "Exception ignored" and drops it (as matplotlib's weakref callbacks did on CI)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = signum

    def __del__(self) -> None:
        if signal.getsignal(self.signum) not in (signal.SIG_DFL, signal.SIG_IGN):  # never kill pytest
            signal.raise_signal(self.signum)


@pytest.mark.parametrize(
    "signum,rc,said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")]
)
def test_a_signal_dropped_by_a_finaliser_still_stops_the_search(tmp_path, monkeypatch, capsys, signum, rc, said):

    steps, returned = [], []
    real_step = DartsSearcher.step

    def step(self, *batches):
        out = real_step(self, *batches)
        steps.append(1)
        if len(steps) == 3:
            _SignalInFinaliser(signum)
            returned.append(1)  # the exception did not come through: dropped
        return out

    monkeypatch.setattr(DartsSearcher, "step", step)
    out = (tmp_path / "run").as_uri()
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_raw("unused", epochs=3)))
    assert main(["search", "--config", str(tmp_path / "cfg.yaml"), "--out", out]) == rc
    err = capsys.readouterr().err
    assert returned == [1], "the signal was not dropped: this test no longer tests the fallback"
    hint = f"continue from the last checkpoint with `distsearch search --out {out} --resume`"
    # its line, and no "Exception ignored" traceback (other lines: Ray's log relay, if a Ray test ran before)
    assert err.splitlines()[-1] == f"{said}: {hint}" and "Exception ignored" not in err, err
    assert len(steps) == 3 and Store(out).list_checkpoints() == []  # stopped in epoch 1 (4 steps), nothing saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_sigterm_mid_search_releases_its_lease_and_the_search_resumes(tmp_path):
    """A cluster preempting `distsearch search` (SIGTERM): exit 143 with the resume hint, no lease
    left (another host would otherwise wait out its heartbeat), and --resume finishes it."""
    raw = tiny_raw("unused", epochs=20, **{"storage.every_n_steps": 1})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distsearch.cli", "search", "--config", "cfg.yaml", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob("checkpoints/*/MANIFEST.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the search ended before it could be terminated"
        assert leases(Store(str(out))), "no lease while it runs"
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and "terminated (SIGTERM): continue from the last checkpoint with" in err, err
    assert leases(Store(str(out))) == []
    done = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "result.json").read_text())["epochs"] == 20


def test_signals_recorded_changes_nothing_off_the_main_thread_or_when_sigint_is_ignored():
    seen = []

    def worker() -> None:
        with signals_recorded():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]
    kept = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. started in the background with nohup
    try:
        with signals_recorded():
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
            _SignalInFinaliser()


def test_attack_and_certify_batches_stop_at_a_dropped_ctrl_c(monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(8, 1, 2, 2), torch.arange(8) % 3
    for run in (
        lambda bar: right_masks(model, x, y, batch_size=2, bar=bar),
        lambda bar: certified_accuracy(model, x, y, [0.1], batch_size=2, bar=bar),
    ):
        bar = _BarThatDropsCtrlC()
        with signals_recorded(), pytest.raises(KeyboardInterrupt):
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


def test_the_hint_names_the_store_and_what_continues_it(tmp_path, monkeypatch, capsys):
    """After an interruption: before anything was saved, rerun; `train` without --out names its
    default folder, not a placeholder; a resume with --allow-changes keeps the flag."""
    import distsearch.runner
    import distsearch.train

    monkeypatch.chdir(tmp_path)
    raw = tiny_raw("unused", epochs=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(distsearch.runner, "build_data", stopped)  # while the data set loads
    assert main(["search", "--config", "cfg.yaml", "--out", "run"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted: rerun the same command (nothing was saved yet)"
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--config", "cfg.yaml", "--out", "run"]) == 0

    def stopped_after_config(cfg, store, **k):
        store.write_json("config.json", cfg.model_dump(mode="json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(distsearch.train, "run_training", stopped_after_config)
    assert main(["train", "--genotype", "run", "--epochs", "1"]) == 130
    last = capsys.readouterr().err.splitlines()[-1]
    want = (
        "interrupted: continue from the last checkpoint with "
        "`distsearch train --out runs/train_run_standard --resume --epochs 1`"
    )
    assert last == want, last
    monkeypatch.setattr(distsearch.runner, "run_search", stopped)
    assert main(["search", "--out", "run", "--resume", "--set", "epochs=2", "--allow-changes"]) == 130
    # stopped before the resume wrote epochs 2 anywhere: the hint gives it again
    want = "`distsearch search --out run --resume --allow-changes --set epochs=2`"
    assert want in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--out", "run", "--resume", "--allow-changes", "--set", "epochs=2"]) == 0  # the hint
    assert json.loads((tmp_path / "run" / "result.json").read_text())["epochs"] == 2
