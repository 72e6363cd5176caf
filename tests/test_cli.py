"""The CLI as a user drives it: bad input exits 2 with the field named and writes nothing;
the quickstart runs end to end; a search killed mid-epoch and rerun with --resume ends
with the same genotype as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from distsearch.cli import main
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, raw, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return str(p)


@pytest.mark.parametrize(
    "over,field",
    [
        ({"space.C": -1}, "space.C"),
        ({"algorithm.name": "nas"}, "algorithm.name: must be one of"),
        ({"data.name": "imagenet"}, "data.name"),
        ({"optim.w_lr": "fast"}, "optim.w_lr"),
        ({"data.train_portion": 1.5}, "data.train_portion"),
        ({"space.ops": ["none", "conv9"]}, "space.ops"),
        ({"bogus": 1}, "bogus"),
        ({"seed": -1}, "seed"),
        ({"optim.arch_betas": [0.5, 1.5]}, "optim.arch_betas"),
        ({"optim.w_lr": float("inf")}, "optim.w_lr"),
        ({"algorithm": {"name": "lease", "audience": "foo"}}, "algorithm.audience"),
        ({"algorithm": {"name": "dsrna", "robust_batch": 17}}, "algorithm.robust_batch"),  # > data.batch_size
    ],
)
def test_bad_config_exits_2_naming_the_field_and_writes_nothing(tmp_path, capsys, over, field):
    out = tmp_path / "out"
    cfg = _write(tmp_path, tiny_raw(str(out), **over))
    for cmd in (["validate", "--config", cfg], ["search", "--config", cfg]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and field in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["search"], "--config"),
        (["search", "--config", "/nonexistent.yaml"], "no such file"),
        (["search", "--config", "{cfg}", "--set", "epochs"], "key=value"),
        (["search", "--config", "{cfg}", "--set", ".epochs=3"], "is not a key"),
        (["search", "--config", "{tmp}"], "is a folder"),
        (["search", "--config", "{tmp}/latin1.yaml"], "not a UTF-8"),
        (["search", "--config", "{cfg}", "--out", ""], "--out"),
        (["search", "--config", "{cfg}", "--out", "/proc/nope"], "cannot write"),
        (["report", "{tmp}", "--out", "{cfg}"], "is a file"),
        (["report", "{tmp}/damaged"], "not valid JSON"),
        (["search", "--config", "{cfg}", "--out", "{tmp}/damaged", "--resume"], "not valid JSON"),
        (["search", "--config", "{cfg}", "--set", "epochs=-3"], "epochs"),
        (["search", "--config", "{cfg}", "--out", "nosuchproto://x/y"], "--out: cannot open"),
        (["search", "--config", "{cfg}", "--set", "storage.uri=nosuchproto://x/y"], "storage.uri: cannot open"),
        (["train", "--model", "mlp", "--set", "data.name=digits", "--out", "/proc/nope"], "--out: cannot write"),
        (["derive", "nosuchproto://x/y"], "URI: cannot open"),
        (["derive", "ftp://127.0.0.1:9/x"], "URI: cannot open 'ftp://127.0.0.1:9/x' ([Errno 111] Connection refused)"),
        (["search", "--config", "{cfg}", "--out", "{cfg}"], "is a file; give a folder"),
        (["run", "--config", "{root}/launch/experiments/quickstart.yaml", "--storage", "/proc/x"], "--storage: cannot"),
        (["derive", "{tmp}/empty"], "no valid checkpoint"),
        (["derive", "{tmp}/damaged"], "holds a run without a valid checkpoint yet; continue it"),
        (["status", "{tmp}/nothing"], "holds no run (no config.json or checkpoint) and no experiment"),
        (["tensorboard", "{cfg}"], "is a file; give a run's --out"),
        # run: refused before Ray starts
        (["run", "--config", "{root}/launch/experiments/quickstart.yaml", "--storage", "{cfg}"], "is a file; give a"),
        (
            ["run", "--config", "{root}/launch/experiments/quickstart.yaml", "--storage", "{tmp}/exproot"],
            "experiment's root",
        ),
        (
            ["run", "--config", "{root}/launch/experiments/quickstart.yaml", "--storage", "{tmp}/run"],
            "lies inside the run",
        ),
        (
            ["run", "--config", "{root}/launch/experiments/quickstart.yaml", "--storage", "{tmp}/x"]
            + ["--set", "data.name=mnist", "--set", "data.root={tmp}/nodata"],
            "data.root: no mnist files",
        ),
        (["tensorboard", "{tmp}/damaged"], "no TensorBoard event files under"),
        (["frobnicate"], "invalid choice"),
        # a config file of another kind: the command that reads it
        (["search", "--config", "{root}/launch/configs/transfer_mnist.yaml"], "use `distsearch transfer --config"),
        (["run", "--config", "{root}/launch/configs/transfer_mnist.yaml"], "is a transfer config"),
        (["transfer", "--config", "{root}/launch/configs/quickstart.yaml"], "use `distsearch search --config"),
        (["train", "--model", "mlp", "--config", "{root}/launch/configs/quickstart.yaml"], "is a search config"),
        (["train", "--model", "mlp", "--config", "{root}/launch/experiments/quickstart.yaml"], "distsearch run"),
        (["search", "--config", "{cfg}", "--threads", "0"], "--threads"),
        (["tensorboard", "{tmp}", "--port", "-1"], "a TCP port is a whole number 1-65535"),
        (["tensorboard", "{tmp}", "--port", "99999"], "a TCP port is a whole number 1-65535"),
        (["attack", "{tmp}", "--eps", "1e308"], "at most 1e4"),
        (["search", "--config", "{cfg}", "--set", "eval.eps=0"], "eval.eps: Input should be greater than 0"),
        # pydantic reads true as 1 for a number; YAML keeps the last of two equal keys
        (["search", "--config", "{cfg}", "--set", "epochs=true"], "epochs: Input should be a valid integer"),
        (["search", "--config", "{cfg}", "--set", "optim.w_lr=false"], "optim.w_lr: Input should be a valid number"),
        (["search", "--config", "{tmp}/twice.yaml"], "'epochs' is set twice (lines 1 and 3); keep one"),
        (["validate", "--config", "{tmp}/empty.yaml"], "empty.yaml sets no keys"),
        (["search", "--config", "{tmp}/empty.yaml"], "empty.yaml sets no keys"),
        # validate refuses what search would, without opening the store or reading the data
        (["validate", "--config", "{cfg}", "--set", "storage.uri=nosuchproto://x/y"], "storage.uri: cannot open"),
        (["validate", "--config", "{cfg}", "--set", "data.cutout=99"], "data.cutout: 99 is larger than"),
        (["validate", "--config", "{cfg}", "--set", "data.batch_size=5000"], "data.batch_size: 5000 is larger than"),
    ],
)
def test_bad_flags_exit_2(tmp_path, capsys, argv, needle):
    cfg = _write(tmp_path, tiny_raw(str(tmp_path / "o")))
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (tmp_path / "twice.yaml").write_text("epochs: 2\nseed: 1\nepochs: 3\n")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    (tmp_path / "exproot").mkdir()
    (tmp_path / "exproot" / "distsearch_experiment.json").write_text("{}")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text("garbage{")
    argv = [a.format(cfg=cfg, tmp=tmp_path, root=ROOT) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_unreachable_storage_is_one_line(tmp_path, capsys, monkeypatch):
    """A remote store that cannot be reached: one line naming the error, exit 2, no traceback."""
    pytest.importorskip("s3fs")
    for k, v in {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    assert main(["derive", "s3://nobucket/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "storage: EndpointConnectionError" in err and len(err.splitlines()) == 1, err


def test_validate_notes_what_only_this_machine_lacks(tmp_path, capsys):
    """Torchvision files missing here, or no GPU for device cuda: ok with a note (the config may be
    for a machine that has them), and never a download from validate."""
    cfg = _write(tmp_path, tiny_raw(str(tmp_path / "o")))
    sets = ["--set", "data.name=mnist", "--set", f"data.root={tmp_path / 'd'}", "--set", "device=cuda"]
    assert main(["validate", "--config", cfg, *sets]) == 0
    err = capsys.readouterr().err
    assert f"note: data.root: no mnist files under '{tmp_path / 'd'}'" in err
    assert "(a run on this machine stops there)" in err
    assert ("no GPU is visible here" in err) != __import__("torch").cuda.is_available()
    assert main(["validate", "--config", cfg, *sets, "--set", "data.download=true"]) == 0
    assert "data.download fetches them when the run starts" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "launch").rglob("*.yaml")))
def test_every_shipped_config_validates(path, capsys):
    """launch/configs and launch/experiments: each reads through its schema (a schema change
    that breaks a shipped file fails here, not on a user's machine)."""
    assert main(["validate", "--config", str(ROOT / path)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_existing_search_needs_resume(tmp_path, capsys):
    cfg = _write(tmp_path, tiny_raw(str(tmp_path / "o"), epochs=1))
    assert main(["search", "--config", cfg]) == 0
    assert main(["search", "--config", cfg]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["search", "--config", cfg, "--resume"]) == 0


@pytest.mark.parametrize("command", ["search", "train"])
def test_a_second_process_on_one_out_is_refused(command, tmp_path, capsys):
    """A live process holds --out (its lease is fresh): `search` / `train` there, even with
    --resume, exit 2 naming it and write nothing; once it is gone (no heartbeat for a minute)
    the run goes ahead."""
    from distsearch.driver_lease import LEASE_DIR

    out = tmp_path / "o"
    lease = {"token": "t0", "host": "gpu-7", "pid": 4242, "command": command, "started": time.time()}
    (out / LEASE_DIR).mkdir(parents=True)
    (out / LEASE_DIR / "t0.json").write_text(json.dumps(dict(lease, beat=time.time())))
    if command == "search":
        argv = ["search", "--config", _write(tmp_path, tiny_raw("unused", epochs=1)), "--out", str(out), "--resume"]
    else:
        argv = ["train", "--model", "small_cnn", "--epochs", "1", "--out", str(out), "--resume", "--set"]
        argv += ["data.synthetic={n: 160, channels: 1, image_size: 8, num_classes: 3}", "--set", "data.name=synthetic"]
        argv += ["--set", "data.batch_size=16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out: {out} is in use by another process (`{command}` pid 4242 on gpu-7" in err, err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in out.rglob("*")) == [LEASE_DIR, "t0.json"]
    (out / LEASE_DIR / "t0.json").write_text(json.dumps(dict(lease, beat=time.time() - 120)))
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "result.json").exists() and not (out / LEASE_DIR).exists()


def test_resume_of_a_config_json_without_epochs_asks_for_them(tmp_path, capsys):
    """A config.json hand-edited to drop `epochs` would resume to the default length (50): refused,
    naming the file and the fix; with --set epochs=N it resumes to N."""
    out = tmp_path / "o"
    assert main(["search", "--config", _write(tmp_path, tiny_raw(str(out), epochs=1))]) == 0
    ran = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in ran.items() if k != "epochs"}))
    capsys.readouterr()
    assert main(["search", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out: {out}/config.json names no epochs" in err and "--set epochs=N" in err, err
    assert main(["search", "--out", str(out), "--resume", "--set", "epochs=2"]) == 0
    assert json.loads((out / "result.json").read_text())["epochs"] == 2


def test_resume_continues_with_the_config_the_run_ran_with(tmp_path, capsys):
    """`--out X --resume` needs no --config: the run's own config.json (with the --set values it
    started with). A --config/--set that changes a value it ran with is refused, naming the key,
    before anything is written; --allow-changes continues anyway; epochs and threads may change."""
    out = tmp_path / "o"
    cfg = _write(tmp_path, tiny_raw("unused", epochs=1))
    assert main(["search", "--config", cfg, "--out", str(out), "--set", "space.C=3", "--set", "optim.w_lr=0.07"]) == 0
    ran = json.loads((out / "config.json").read_text())
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    capsys.readouterr()
    # the file without the --set values it started with: refused, one line, nothing written
    assert main(["search", "--config", cfg, "--out", str(out), "--resume", "--set", "epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    changed = "ran with other values (optim.w_lr: 0.07 -> 0.025; space.C: 3 -> 2)"
    assert err.startswith(f"distsearch search: --out: {out} {changed}"), err
    assert f"`distsearch search --out {out} --resume`" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts
    assert json.loads((out / "config.json").read_text()) == ran
    # as it ran, two epochs now, on one thread
    assert main(["search", "--out", str(out), "--resume", "--set", "epochs=2", "--threads", "1"]) == 0
    now = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in now.items() if k != "epochs"} == {k: v for k, v in ran.items() if k != "epochs"}
    assert now["epochs"] == 2 and json.loads((out / "result.json").read_text())["epochs"] == 2
    # a deliberate change
    argv = ["search", "--out", str(out), "--resume", "--set", "epochs=3", "--set", "optim.w_lr=0.01"]
    assert main(argv) == 2 and "optim.w_lr: 0.07 -> 0.01" in capsys.readouterr().err
    assert main([*argv, "--allow-changes"]) == 0
    assert json.loads((out / "config.json").read_text())["optim"]["w_lr"] == 0.01


def test_a_hand_edited_config_json_cannot_change_what_a_resume_runs(tmp_path, capsys):
    """Each checkpoint carries the config it ran with: a config.json edited after it was written
    is refused on --resume, naming the key, with nothing written; the advice works: --config with
    the values it ran with continues it (and puts config.json right); so does --allow-changes."""
    from distsearch.storage import Store
    from tests.conftest import store_files

    out = tmp_path / "o"
    cfg = _write(tmp_path, tiny_raw("unused", epochs=1))
    assert main(["search", "--config", cfg, "--out", str(out)]) == 0
    ran = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**ran, "optim": {**ran["optim"], "w_lr": 0.5}}))
    before = store_files(Store(str(out)))
    capsys.readouterr()
    assert main(["search", "--out", str(out), "--resume", "--set", "epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"distsearch search: --out: {out} ran with other values (optim.w_lr: 0.025 -> 0.5); its config.json says "
        "otherwise (edited, or an --allow-changes resume stopped before its first checkpoint): pass --config with "
        "the values it ran with, or --allow-changes"
    ), err
    assert store_files(Store(str(out))) == before
    assert main(["search", "--config", cfg, "--out", str(out), "--resume", "--set", "epochs=2"]) == 0
    assert json.loads((out / "config.json").read_text())["optim"]["w_lr"] == 0.025
    (out / "config.json").write_text(json.dumps({**ran, "epochs": 3, "optim": {**ran["optim"], "w_lr": 0.5}}))
    assert main(["search", "--out", str(out), "--resume", "--allow-changes"]) == 0
    assert json.loads((out / "result.json").read_text())["epochs"] == 3


def test_a_run_resumes_from_its_checkpoint_record_without_config_json(tmp_path, capsys):
    """config.json deleted: `--resume` continues with the config the newest checkpoint recorded; a
    `train --resume` that also names its --genotype keeps the run's other values (here C=3)."""
    out = tmp_path / "o"
    assert main(["search", "--config", _write(tmp_path, tiny_raw("unused", epochs=1)), "--out", str(out)]) == 0
    (out / "config.json").unlink()
    assert main(["search", "--out", str(out), "--resume", "--set", "epochs=2"]) == 0
    assert json.loads((out / "result.json").read_text())["epochs"] == 2 and (out / "config.json").exists()
    t = tmp_path / "t"
    argv = [
        "train",
        "--genotype",
        str(out),
        "--out",
        str(t),
        "--epochs",
        "1",
        "--set",
        "model.C=3",
        "--set",
        "model.layers=2",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["train", "--genotype", str(out), "--out", str(t), "--resume", "--epochs", "2"]) == 0, (
        capsys.readouterr().err
    )
    assert json.loads((t / "config.json").read_text())["model"]["C"] == 3


def test_no_run_is_written_inside_another(tmp_path, capsys):
    """--out inside a run (its checkpoints/, tb/, a sub-folder) is refused, naming the run, with
    nothing written; so is `transfer --out` at a run's own folder."""
    from distsearch.storage import Store
    from tests.conftest import store_files

    run = tmp_path / "s"
    cfg = _write(tmp_path, tiny_raw("unused", epochs=1))
    assert main(["search", "--config", cfg, "--out", str(run)]) == 0
    before = store_files(Store(str(run)))
    capsys.readouterr()
    for inside in ("checkpoints", "tb", "sub/deeper"):
        assert main(["search", "--config", cfg, "--out", str(run / inside)]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err == f"distsearch search: --out: {run / inside} lies inside the run at {run}; choose a folder outside it"
        )
    assert main(["train", "--genotype", str(run), "--out", str(run / "tb"), "--epochs", "1"]) == 2
    assert "lies inside the run at" in capsys.readouterr().err
    transfer = ROOT / "launch/configs/transfer_mnist.yaml"
    assert main(["transfer", "--config", str(transfer), "--out", str(run)]) == 2
    assert f"--out: {run} holds a search or training run" in capsys.readouterr().err
    assert store_files(Store(str(run))) == before


def test_resuming_a_finished_run_adds_nothing(tmp_path, capsys):
    """`--resume` of a finished search prints its genotype and writes no second TensorBoard file
    nor result."""
    out = tmp_path / "o"
    assert main(["search", "--config", _write(tmp_path, tiny_raw("unused", epochs=1)), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    events, result = sorted((out / "tb").rglob("events.out.tfevents*")), (out / "result.json").read_bytes()
    assert main(["search", "--out", str(out), "--resume"]) == 0
    assert capsys.readouterr().out == first
    assert sorted((out / "tb").rglob("events.out.tfevents*")) == events and (out / "result.json").read_bytes() == result


def test_status_of_one_run(tmp_path, capsys):
    """`status` on a search's --out (no Ray): how far, headline metrics, and running / finished /
    interrupted with the command that continues it."""
    from distsearch.driver_lease import LEASE_DIR

    out = tmp_path / "o"
    assert main(["search", "--config", _write(tmp_path, tiny_raw(str(out), epochs=1))]) == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{out}: search (darts) on synthetic, epoch 1 of 1"
    assert lines[1].startswith("  data: 128 training and 32 test images of 1x8x8, 3 classes (sha256 ")  # data.json
    assert lines[2].startswith("  val/acc ") and lines[3] == f"finished: {out}/result.json"
    (out / "result.json").unlink()  # as if killed before the end
    assert main(["status", str(out)]) == 0
    assert f"interrupted: continue it with `distsearch search --out {out} --resume`" in capsys.readouterr().out
    lease = {"token": "t", "host": "gpu-7", "pid": 7, "command": "search", "started": time.time(), "beat": time.time()}
    (out / LEASE_DIR).mkdir()
    (out / LEASE_DIR / "t.json").write_text(json.dumps(lease))
    assert main(["status", str(out)]) == 0
    assert "running: `search` pid 7 on gpu-7" in capsys.readouterr().out
    assert main(["resume", str(out)]) == 2  # `resume` is for experiments: it names the command
    assert f"continue it with `distsearch search --out {out} --resume`" in capsys.readouterr().err


def test_status_after_a_resume_with_changes_stopped_before_its_checkpoint(tmp_path, capsys):
    """A resume with --allow-changes rewrites config.json at once; stopped before its first
    checkpoint, the newest checkpoint records the old values and a plain --resume is refused:
    status says --allow-changes, and that command finishes the run."""
    from distsearch.config_file import parse_config, stored_config
    from distsearch.runner import Interrupted, run_search
    from distsearch.storage import Store

    out = tmp_path / "o"
    raw = tiny_raw(str(out), epochs=2)
    store = Store(str(out))
    with pytest.raises(Interrupted):
        run_search(parse_config(raw), store, stop_after_steps=5)  # epoch 1 (4 steps) checkpointed
    changed = parse_config(stored_config(str(out), "search", ["optim.w_lr=0.05"]))
    with pytest.raises(Interrupted):
        run_search(changed, store, stop_after_steps=5, allow_changes=True)  # one step of epoch 2, no checkpoint
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    hint = f"distsearch search --out {out} --resume --allow-changes"
    assert f"interrupted: continue it with `{hint}`" in capsys.readouterr().out
    assert main(["search", "--out", str(out), "--resume"]) == 2
    assert "--allow-changes" in capsys.readouterr().err
    assert main(hint.split()[1:]) == 0


def test_a_trials_store_is_not_written_beside_its_experiments_driver(tmp_path, capsys):
    """`search --out <root>/<trial>/search --resume` while the experiment's driver runs is refused
    (the driver's trial would write the same store); status on that trial names the driver."""
    from distsearch.driver_lease import LEASE_DIR

    root = tmp_path / "exp"
    trial = root / "t1" / "search"
    root.mkdir()
    (root / "distsearch_experiment.json").write_text("{}")
    assert main(["search", "--config", _write(tmp_path, tiny_raw(str(trial), epochs=1))]) == 0
    (trial / "result.json").unlink()  # unfinished
    lease = {"token": "t", "host": "gpu-7", "pid": 7, "command": "run", "started": time.time(), "beat": time.time()}
    (root / LEASE_DIR).mkdir()
    (root / LEASE_DIR / "t.json").write_text(json.dumps(lease))
    capsys.readouterr()
    assert main(["search", "--out", str(trial), "--resume", "--set", "epochs=2"]) == 2
    err = capsys.readouterr().err
    assert f"in use by another process (it holds {root}) (`run` pid 7 on gpu-7" in err, err
    for uri in (trial, trial.parent):  # the trial's store, or its folder
        assert main(["status", str(uri)]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{trial}: search (darts)") and "running: `run` pid 7 on gpu-7" in out, out
    (root / LEASE_DIR / "t.json").unlink()
    assert main(["status", str(trial)]) == 0
    assert f"not running: continue the experiment with `distsearch resume {root}`" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["search"], "--config: required (or --out URI --resume"),
        (["search", "--out", "{tmp}/none", "--resume"], "holds no run to resume (no config.json)"),
        (["train", "--epochs", "1"], "--model or --genotype: one is required"),
        (["train", "--out", "{tmp}/s", "--resume"], "holds a search run; continue it: distsearch search --out"),
        (["search", "--out", "{tmp}/exp", "--resume"], "is an experiment root; continue it with `distsearch resume"),
        (
            ["search", "--out", "{tmp}/old", "--resume"],
            "old/config.json does not load in this version of distsearch (its error: algorithm.unrolled: unknown key",
        ),
    ],
)
def test_resume_without_a_config_needs_a_run(argv, needle, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text(json.dumps(tiny_raw(str(tmp_path / "s"))))
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "distsearch_experiment.json").write_text("{}")
    (tmp_path / "old").mkdir()  # written by a version that had a field this one does not
    (tmp_path / "old" / "config.json").write_text(json.dumps(tiny_raw("x", **{"algorithm.unrolled": True})))
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_quickstart_end_to_end_with_a_smaller_override(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = [
        "search",
        "--config",
        str(ROOT / "launch/configs/quickstart.yaml"),
        "--out",
        str(out),
        "--set",
        "epochs=1",
        "--set",
        "data.subset=256",
        "--set",
        "space.C=2",
        "--set",
        "monitor.progress=false",
        "--set",
        "threads=1",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tensorboard --logdir" in printed
    genotype = json.loads((out / "genotype.json").read_text())
    assert main(["derive", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == genotype
    assert list((out / "tb").glob("events.out.tfevents*"))


def test_killed_mid_epoch_then_resumed_gives_the_same_genotype(tmp_path):
    over = {"epochs": 3, "storage.every_n_steps": 1, "data.synthetic.n": 320}
    straight = _write(tmp_path, tiny_raw(str(tmp_path / "straight"), **over), "a.yaml")
    assert main(["search", "--config", straight]) == 0
    killed_out = tmp_path / "killed"
    killed = _write(tmp_path, tiny_raw(str(killed_out), **over), "b.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "distsearch.cli", "search", "--config", killed]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = killed_out / "checkpoints"
    deadline = time.time() + 120
    newest = lambda: max((int(p.parent.name.split("-")[1]) for p in ckpts.glob("*/MANIFEST.json")), default=0)
    while time.time() < deadline and newest() < 10:  # 8 steps per epoch: stop inside epoch 2
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.parent.name.split("-")[1]) for p in ckpts.glob("*/MANIFEST.json"))
    assert steps and steps[-1] % 8 != 0 and steps[-1] < 24, f"killed mid-epoch, not at {steps}"
    assert subprocess.run(cmd + ["--resume"], env=env, capture_output=True).returncode == 0
    a = json.loads((tmp_path / "straight" / "genotype.json").read_text())
    b = json.loads((killed_out / "genotype.json").read_text())
    assert a == b
    ra = json.loads((tmp_path / "straight" / "result.json").read_text())["metrics"]
    rb = json.loads((killed_out / "result.json").read_text())["metrics"]
    assert ra["val/loss"] == rb["val/loss"] and ra["train/train_loss"] == rb["train/train_loss"]


def test_bare_command_lists_the_commands_and_version_and_verbose_anywhere(capsys):
    from distsearch import __version__
    from distsearch.cli import build_parser

    assert main([]) == 2
    err = capsys.readouterr().err
    assert all(c in err for c in ("search", "train", "evaluate", "attack", "certify", "run", "status"))
    assert err.strip().splitlines()[-1].startswith("distsearch: error: give a command")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"distsearch {__version__}"
    parse = build_parser().parse_args
    assert parse(["validate", "--config", "c.yaml", "-v"]).verbose  # after the command
    assert parse(["-v", "validate", "--config", "c.yaml"]).verbose  # before it: kept
    assert not parse(["validate", "--config", "c.yaml"]).verbose


def test_help_shows_real_defaults_and_where_configs_live(capsys):
    from distsearch.config import TrainConfig

    def help_of(*cmd):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        return " ".join(capsys.readouterr().out.split())

    train = help_of("train")
    assert f"else {TrainConfig.model_fields['epochs'].default})" in train
    assert "8/255 linf for fgsm" in train and "1.0 l2 for fgm, freelb" in train
    assert "runs/train_" in train and "(default: the config's)" not in train
    assert "0.1 for linf, 1.0 for l2" in help_of("attack")
    assert "launch/experiments/" in help_of("run") and "launch/configs/" in help_of("search")
    for cmd in ("evaluate", "attack", "certify", "search", "train", "transfer"):
        assert "--threads" in help_of(cmd), cmd


def test_validate_an_experiment_names_its_trial_root(capsys):
    assert main(["validate", "--config", str(ROOT / "launch/experiments/quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"experiment root {os.path.abspath('runs/quickstart')} " in out and "runs/search" not in out
    assert main(["validate", "--config", str(ROOT / "launch/experiments/quickstart.yaml"), "--set", "name=.."]) == 2
    assert "name: '..' must be a plain folder name" in capsys.readouterr().err  # as `run` refuses it


def test_single_search_configs_do_not_write_into_an_experiment_root():
    """launch/configs/*.yaml (one run each) never name an experiment file's root, <tune.storage>/<name>
    of launch/experiments/*.yaml, as their storage.uri."""
    import posixpath

    from distsearch.config_file import config_kind, read_yaml

    roots = set()
    for path in (ROOT / "launch/experiments").glob("*.yaml"):
        raw = read_yaml(path)
        roots.add(posixpath.join(raw["tune"]["storage"], raw["name"]))
    for path in (ROOT / "launch/configs").glob("*.yaml"):
        raw = read_yaml(path)
        assert config_kind(raw) in ("search", "train", "transfer"), path
        assert raw["storage"]["uri"] not in roots, path


def test_search_into_an_experiment_root_is_refused(tmp_path, capsys):
    root = tmp_path / "exp"
    root.mkdir()
    (root / "distsearch_experiment.json").write_text("{}")
    cfg = _write(tmp_path, tiny_raw(str(tmp_path / "o"), epochs=1))
    for argv in (["search", "--config", cfg, "--out", str(root)], ["train", "--model", "mlp", "--out", str(root)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "root of a `distsearch run` experiment" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in root.iterdir()) == ["distsearch_experiment.json"]


def test_search_with_an_experiment_file_says_it_ignores_tune(tmp_path, capsys):
    raw = tiny_raw(str(tmp_path / "o"), epochs=1, tune={"params": {"seed": {"choice": [0, 1]}}})
    assert main(["search", "--config", _write(tmp_path, raw)]) == 0
    assert "is an experiment file: `search` runs one search of its base config" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import errno

    import distsearch.storage

    out = tmp_path / "run"
    cfg = _write(tmp_path, tiny_raw(str(out), epochs=1))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(distsearch.storage.os, "fsync", full)
    assert main(["search", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "No space left on device; free space, then rerun the same command (nothing was saved yet)"
    ), err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_a_new_run_on_an_out_holding_one_says_which_command_continues_it(tmp_path, capsys):
    search = tmp_path / "s"
    cfg = _write(tmp_path, tiny_raw(str(search), epochs=1))
    assert main(["search", "--config", str(cfg)]) == 0
    assert main(["search", "--config", str(cfg)]) == 2
    assert f"--out: {search} already holds a search run; pass --resume" in capsys.readouterr().err.replace(
        "storage.uri", "--out"
    )
    train = tmp_path / "t"
    argv = ["train", "--model", "mlp", "--epochs", "1", "--set", "data.name=digits", "--set", "data.subset=64"]
    assert main([*argv, "--out", str(train), "--set", "monitor.progress=false"]) == 0
    capsys.readouterr()
    assert main(["search", "--config", str(cfg), "--out", str(train)]) == 2
    err = capsys.readouterr().err
    assert f"holds a train run (continue it: distsearch train --out {train} --resume)" in err, err
    assert main([*argv, "--out", str(search)]) == 2
    assert f"holds a search run (continue it: distsearch search --out {search} --resume)" in capsys.readouterr().err


def test_a_trials_folder_is_read_as_its_search(tmp_path, tiny_config, capsys):
    """<experiment>/<trial> (what `status` lists) works where its search folder does: derive,
    report; resume names the experiment to resume instead of the trial's search."""
    from distsearch.runner import run_search
    from distsearch.storage import Store

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "distsearch_experiment.json").write_text("{}")
    store = Store(str(tmp_path / "exp" / "t1" / "search"))
    result = run_search(tiny_config(store.uri, epochs=1), store)
    trial = str(tmp_path / "exp" / "t1")
    capsys.readouterr()
    assert main(["derive", trial]) == 0
    assert json.loads(capsys.readouterr().out) == result.genotype.to_dict()
    assert main(["report", trial, "--out", str(tmp_path / "rep")]) == 0
    assert "## t1" in (tmp_path / "rep" / "report.md").read_text()
    for uri in (trial, store.uri):
        assert main(["resume", uri]) == 2
        assert f"resume the experiment: `distsearch resume {tmp_path / 'exp'}`" in capsys.readouterr().err


def test_set_reaches_a_sampled_keys_spec():
    """tune.params' keys are dotted config keys: --set tune.params.weight_at.strategy.choice=[...]
    sets that key's choice (it made a nested weight_at section, 'unknown key')."""
    from distsearch.config_file import apply_overrides

    raw = {"tune": {"params": {"weight_at.strategy": {"choice": ["standard"]}}}}
    sets = ["tune.params.weight_at.strategy.choice=[standard, fgsm]", "tune.params.optim.w_lr={uniform: [0.1, 0.2]}"]
    assert apply_overrides(raw, sets)["tune"]["params"] == {
        "weight_at.strategy": {"choice": ["standard", "fgsm"]},
        "optim.w_lr": {"uniform": [0.1, 0.2]},
    }
